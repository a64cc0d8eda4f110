"""Labelled matplotlib figures for the logger: every heatmap names its rows and columns and has a
colour bar, so a chart read without the code still says what it shows."""

from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure


def draw_heatmap(
    axes: Axes,
    values: np.ndarray,
    rows: list[str],
    columns: list[str],
    title: str,
    colour_label: str,
    vmin: float = 0.0,
    vmax: float | None = None,
    cell_format: str | None = "{:.0f}",
    column_title: str = "",
) -> None:
    """`values` [rows, columns] on `axes` with labelled ticks and a colour bar. NaN cells stay
    blank. With `cell_format`, each cell carries its value when the grid is small enough."""
    values = np.asarray(values, dtype=float)
    finite = np.isfinite(values)
    top = vmax if vmax is not None else float(np.nanmax(values)) if finite.any() else 1.0
    top = max(top, vmin + 1e-9)
    image = axes.imshow(np.ma.masked_invalid(values), vmin=vmin, vmax=top, cmap="viridis", aspect="auto")
    long_names = max(map(len, columns), default=0) > 3
    axes.set_xticks(
        range(len(columns)), columns, rotation=45 if long_names else 0, ha="right" if long_names else "center"
    )
    axes.set_yticks(range(len(rows)), rows, fontsize=7 if len(rows) > 24 else 9)
    axes.tick_params(axis="x", labelsize=7 if len(columns) > 12 else 9)
    axes.set_xlabel(column_title)
    axes.set_title(title, fontsize=10)
    if cell_format is not None and values.size <= 480:
        for (i, j), value in np.ndenumerate(values):
            if np.isfinite(value):
                colour = "white" if value < vmin + 0.6 * (top - vmin) else "black"
                axes.text(j, i, cell_format.format(value), ha="center", va="center", color=colour, fontsize=6)
    axes.figure.colorbar(image, ax=axes, label=colour_label, fraction=0.06, pad=0.02)


def heatmap_figure(
    values: np.ndarray, rows: list[str], columns: list[str], title: str, colour_label: str, **options
) -> Figure:
    """One labelled heatmap (see `draw_heatmap` for the options) in a figure sized to its grid."""
    height = 1.6 + 0.24 * len(rows)
    width = 3.0 + max(0.5 * len(columns), 1.5) + 0.07 * max((len(r) for r in rows), default=0)
    figure = Figure(figsize=(min(width, 14.0), min(height, 30.0)), layout="constrained")
    draw_heatmap(figure.add_subplot(), values, rows, columns, title, colour_label, **options)
    return figure

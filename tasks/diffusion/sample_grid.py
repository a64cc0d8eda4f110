"""Generated images as a figure a person can read: each image under its prompt."""

from __future__ import annotations

import math
import textwrap

from matplotlib.figure import Figure
from torch import Tensor


def captioned_figure(images: Tensor, captions: list[str], columns: int = 8) -> Figure:
    """images [N, C, H, W] in [0, 1] -> a matplotlib figure, one titled panel per image."""
    rows = math.ceil(len(images) / columns)
    columns = min(columns, len(images))
    figure = Figure(figsize=(1.9 * columns, 2.2 * rows), layout="constrained")
    for index, (image, caption) in enumerate(zip(images, captions, strict=True)):
        axes = figure.add_subplot(rows, columns, index + 1)
        pixels = image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
        axes.imshow(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels, cmap="gray", vmin=0, vmax=1)
        axes.set_title("\n".join(textwrap.wrap(caption, 22)), fontsize=7)
        axes.set_axis_off()
    return figure

"""Shared by the benchmarks: interleaved timing rounds and a markdown table of ratios."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path


def measure(steps: dict[str, Callable[[], None]], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Milliseconds per call of every step; rounds interleave the steps so that drift in machine
    load hits all of them alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def ratio_table(
    times: dict[str, list[float]],
    reference: str,
    decimals: int = 2,
    columns: dict[str, dict[str, str]] | None = None,
) -> list[str]:
    """Median, interquartile range and ratio of medians to `reference`, one row per variant,
    plus `columns` (title -> text per variant; a variant without one gets an empty cell)."""
    columns = columns or {}
    base = statistics.median(times[reference])
    titles = "".join(f" {title} |" for title in columns)
    rows = [
        f"| variant | median ms | IQR ms | × {reference} |{titles}",
        "|---|---:|---:|---:|" + "---:|" * len(columns),
    ]
    for name, samples in times.items():
        q1, _, q3 = statistics.quantiles(samples, n=4)
        median = statistics.median(samples)
        cells = "".join(f" {column.get(name, '')} |" for column in columns.values())
        rows.append(
            f"| {name} | {median:.{decimals}f} | {q3 - q1:.{decimals}f} | {median / base:.2f} |{cells}"
        )
    return rows


def tokens_per_second(times: dict[str, list[float]], tokens: int) -> dict[str, str]:
    """Throughput of each variant from its median time per call of `tokens` tokens."""
    return {name: f"{tokens / statistics.median(samples) * 1e3:.0f}" for name, samples in times.items()}


def publish(lines: list[str], output: Path | None) -> None:
    """Print the markdown report and, when asked, write it to `output`."""
    report = "\n".join(lines) + "\n"
    print(report)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(report)

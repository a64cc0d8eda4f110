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
    times: dict[str, list[float]], reference: str, decimals: int = 2, tokens: int | None = None
) -> list[str]:
    """Median, interquartile range and ratio of medians to `reference`, one row per variant;
    with `tokens` (per call) also the throughput in tokens per second."""
    base = statistics.median(times[reference])
    throughput = " tokens/s |" if tokens else ""
    rows = [
        f"| variant | median ms | IQR ms |{throughput} × {reference} |",
        "|---|---:|---:|" + "---:|" * (2 if tokens else 1),
    ]
    for name, samples in times.items():
        q1, _, q3 = statistics.quantiles(samples, n=4)
        median = statistics.median(samples)
        rate = f" {tokens / median * 1e3:.0f} |" if tokens else ""
        rows.append(
            f"| {name} | {median:.{decimals}f} | {q3 - q1:.{decimals}f} |{rate} {median / base:.2f} |"
        )
    return rows


def publish(lines: list[str], output: Path | None) -> None:
    """Print the markdown report and, when asked, write it to `output`."""
    report = "\n".join(lines) + "\n"
    print(report)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(report)

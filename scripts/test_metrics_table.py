"""A markdown table of test metrics read from TensorBoard runs: one row per NAME, the mean over
its runs (seeds) with each run's value in brackets, one column per metric under a prefix.

    python scripts/test_metrics_table.py --prefix test/accuracy/ \\
        LoRA=runs/multimodal/lora/seed0-test,runs/multimodal/lora/seed1-test MoLE=...
"""

from __future__ import annotations

import argparse
from statistics import mean

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def last_scalars(run_dir: str, prefix: str) -> dict[str, float]:
    events = EventAccumulator(run_dir)
    events.Reload()
    return {
        tag.removeprefix(prefix): events.Scalars(tag)[-1].value
        for tag in events.Tags()["scalars"]
        if tag.startswith(prefix)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="+", help="NAME=run_dir[,run_dir...]")
    parser.add_argument("--prefix", default="test/accuracy/")
    parser.add_argument("--no-mean", action="store_true", help="no mean-over-columns column")
    parser.add_argument("--scale", type=float, default=100.0, help="100: fractions as percent; 1: as logged")
    args = parser.parse_args()
    table = {}
    for row in args.rows:
        name, _, dirs = row.partition("=")
        table[name] = [last_scalars(d, args.prefix) for d in dirs.split(",")]
    columns = sorted(next(iter(table.values()))[0])
    totals = [] if args.no_mean else ["mean"]
    print("| model | " + " | ".join(columns + totals) + " |")
    print("|---|" + "---:|" * (len(columns) + len(totals)))
    for name, runs in table.items():
        cells = []
        for index, column in enumerate(columns + totals):
            total = index >= len(columns)  # the mean over columns (a metric may be named "mean" too)
            values = [mean(run.values()) if total else run[column] for run in runs]
            digits = 0 if args.scale >= 100 else 2
            each = ", ".join(f"{args.scale * v:.{digits}f}" for v in values)
            cells.append(f"{args.scale * mean(values):.{digits + 1}f} ({each})")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

"""Per-domain accuracy of prediction files (from JsonlPredictionWriter) as one markdown table.

    python scripts/prediction_table.py NAME=runs/.../predictions.jsonl [NAME=...] [--field strict_correct]

One row per NAME, one column per domain plus the mean over domains (each domain weighs the same).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def domain_accuracy(path: Path, field: str) -> dict[str, float]:
    outcomes: dict[str, list[bool]] = defaultdict(list)
    for line in path.read_text().splitlines():
        record = json.loads(line)
        outcomes[record.get("domain", "all")].append(bool(record[field]))
    return {domain: sum(values) / len(values) for domain, values in outcomes.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="NAME=path/to/predictions.jsonl")
    parser.add_argument("--field", default="strict_correct")
    args = parser.parse_args()
    rows = {}
    for run in args.runs:
        name, _, path = run.partition("=")
        rows[name] = domain_accuracy(Path(path), args.field)
    domains = list(next(iter(rows.values())))
    print("| model | " + " | ".join(domains) + " | mean |")
    print("|---|" + "---:|" * (len(domains) + 1))
    for name, accuracy in rows.items():
        cells = [f"{100 * accuracy.get(domain, float('nan')):.0f}" for domain in domains]
        mean = sum(accuracy.get(domain, 0.0) for domain in domains) / len(domains)
        print(f"| {name} | " + " | ".join(cells) + f" | {100 * mean:.1f} |")


if __name__ == "__main__":
    main()

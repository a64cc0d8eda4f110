"""Mutual information between domain and chosen expert, per layer, from a test run's
`test_domain_routing.json`: its mean and best layer, the mean per block, and the same among a
subset of the domains (e.g. the image domains only).

    python scripts/routing_information.py runs/multimodal/unimoe/seed0-test \\
        --among fashion digits textile grid
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lightning_moe.routing_logging import block_grid, mutual_information


def summary(layers: dict[str, torch.Tensor], label: str) -> str:
    information = {name: mutual_information(counts) for name, counts in layers.items()}
    best = max(information, key=information.get)
    rows, _, place = block_grid(list(information))
    per_block = [[] for _ in rows]
    for name, bits in information.items():
        per_block[place[name][0]].append(bits)
    blocks = " ".join(f"{sum(b) / len(b):.2f}" for b in per_block)
    return (
        f"{label}: mean {sum(information.values()) / len(information):.3f} bits, best {information[best]:.3f} "
        f"({best}); per block, first to last: {blocks}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="test run folders")
    parser.add_argument("--among", nargs="+", default=None, help="also: only these domains")
    arguments = parser.parse_args()
    for run in arguments.runs:
        record = json.loads((run / "test_domain_routing.json").read_text())
        groups = record["groups"]
        layers = {name: torch.tensor(layer["counts"]) for name, layer in record["layers"].items()}
        print(f"== {run}")
        print(summary(layers, f"all {len(groups)} domains"))
        if arguments.among:
            rows = [groups.index(g) for g in arguments.among if g in groups]
            print(summary({n: c[rows] for n, c in layers.items()}, " ".join(arguments.among)))


if __name__ == "__main__":
    main()

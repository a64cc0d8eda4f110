"""The domain × expert routing heatmaps of test runs, side by side in one image: for each run, the
share of each domain's routed token assignments that went to each expert, summed over every
routed layer (from the run's `test_domain_routing.json`).

    python scripts/routing_heatmaps.py MoLE=runs/multimodal/mix-mole/seed0-test \\
        Uni-MoE=runs/multimodal/unimoe/seed0-test --output docs/images/unimoe_routing.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from lightning_moe.figures import draw_heatmap


def domain_shares(run: Path, what: str = "domain") -> tuple[list[str], np.ndarray]:
    """(groups, [groups, experts] shares in %) summed over the run's routed layers."""
    record = json.loads((run / f"test_{what}_routing.json").read_text())
    counts = sum(np.asarray(layer["counts"], dtype=float) for layer in record["layers"].values())
    return record["groups"], 100 * counts / counts.sum(axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="LABEL=test run folder")
    parser.add_argument("--output", type=Path, required=True, help="the PNG to write (refused if it exists)")
    parser.add_argument("--what", default="domain", choices=["domain", "modality"])
    arguments = parser.parse_args()
    if arguments.output.exists():
        parser.error(f"{arguments.output} exists; choose another name (nothing was overwritten)")
    panels = [
        (label, *domain_shares(Path(folder), arguments.what))
        for label, _, folder in (r.partition("=") for r in arguments.runs)
    ]
    figure = Figure(
        figsize=(4.2 * len(panels), 0.6 + 0.45 * max(len(p[1]) for p in panels)), layout="constrained"
    )
    for axes, (label, groups, shares) in zip(
        figure.subplots(1, len(panels), squeeze=False)[0], panels, strict=True
    ):
        experts = [str(e) for e in range(shares.shape[1])]
        draw_heatmap(
            axes, shares, groups, experts, label, "% of routed tokens", vmax=100.0, column_title="expert"
        )
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(arguments.output, dpi=110)
    print(f"wrote {arguments.output}")


if __name__ == "__main__":
    main()

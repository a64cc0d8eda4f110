"""The tables and the loss-curve figure of docs/inits.md, from the runs of scripts/inits_results.sh.

    python scripts/inits_table.py runs/inits

Each run's TensorBoard events give its last validation scores and its training-loss curve; seeds
are averaged (mean ± half the range). MoLE runs add the router entropy at the last logged step
and the experts' diversity (mean |cosine| between the flattened updates B_e A_e of the experts of
each layer, over layers: 1 = identical experts, 0 = orthogonal; experts that never trained, B = 0,
left out). Intruder counts come from the
`inspect intruders` reports.
"""

from __future__ import annotations

import argparse
import re
from itertools import combinations
from pathlib import Path

import matplotlib
import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_moe.adapters.adapter_folder import read_weights

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402

METRICS = ["val/strict_match", "val/flexible_match", "val/loss"]


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run)).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def runs_of(root: Path, name: str) -> list[Path]:
    return sorted(path for path in (root / name).glob("s*") if (path / "adapter").is_dir())


def cell(values: list[float], percent: bool) -> str:
    if not values:
        return "–"
    scale = 100.0 if percent else 1.0
    mean, half = np.mean(values) * scale, (max(values) - min(values)) * scale / 2
    return f"{mean:.1f} ± {half:.1f}" if percent else f"{mean:.3f} ± {half:.3f}"


def score_table(root: Path, names: list[str], extra: dict[str, callable] | None = None) -> str:
    extra = extra or {}
    header = ["variant", "seeds", "strict match %", "flexible match %", "val loss", *extra]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        runs = runs_of(root, name)
        if not runs:
            continue
        logged = [scalars(run) for run in runs]
        cells = [cell([log[m][-1][1] for log in logged if m in log], m != "val/loss") for m in METRICS]
        more = [
            cell([f(run, log) for run, log in zip(runs, logged, strict=True)], False) for f in extra.values()
        ]
        lines.append("| " + " | ".join([name, str(len(runs)), *cells, *more]) + " |")
    return "\n".join(lines)


def router_entropy(run: Path, log: dict) -> float:
    return log["routing/entropy"][-1][1]


def expert_similarity(run: Path, log: dict) -> float:
    weights = read_weights(run / "adapter")
    values = []
    for key, lora_A in weights.items():
        if key.endswith("experts.lora_A"):
            updates = (weights[key.replace("lora_A", "lora_B")] @ lora_A).flatten(1).double()
            updates = updates[updates.norm(dim=1) > 0]  # an expert no token chose kept B = 0
            updates = updates / updates.norm(dim=1, keepdim=True)
            values += [
                float((updates[i] @ updates[j]).abs()) for i, j in combinations(range(len(updates)), 2)
            ]
    return float(np.mean(values))


def loss_figure(root: Path, names: list[str], path: Path) -> None:
    figure = Figure(figsize=(7, 4), layout="constrained")
    axes = figure.add_subplot()
    for name in names:
        curves = [scalars(run).get("train/task_loss", []) for run in runs_of(root, name)]
        curves = [curve for curve in curves if curve]
        if not curves:
            continue
        length = min(len(curve) for curve in curves)
        steps = [step for step, _ in curves[0][:length]]
        mean = np.mean([[value for _, value in curve[:length]] for curve in curves], axis=0)
        axes.plot(steps, mean, label=name)
    axes.set(
        xlabel="step", ylabel="training loss (mean over seeds)", yscale="log", title="plain LoRA, demo budget"
    )
    axes.legend()
    figure.savefig(path, dpi=110)


def last_scores(runs: list[Path]) -> list[str]:
    """strict % and val loss over the seeds' runs, as two cells."""
    logged = [scalars(run) for run in runs]
    return [cell([log[m][-1][1] for log in logged if m in log], m != "val/loss") for m in METRICS[::2]]


def dylora_table(root: Path) -> str:
    lines = [
        "| rank | seeds | DyLoRA (one training), strict % | DyLoRA val loss "
        "| LoRA trained at that rank, strict % | its val loss |",
        "|---|---|---|---|---|---|",
    ]
    for rank in (1, 2, 4, 8):
        cut = runs_of(root, f"dylora_r{rank}")
        alone = runs_of(root, "kaiming" if rank == 8 else f"lora_r{rank}")
        alone_cells = last_scores(alone) if rank > 1 else ["–", "–"]
        lines.append("| " + " | ".join([str(rank), str(len(cut)), *last_scores(cut), *alone_cells]) + " |")
    return "\n".join(lines)


def intruder_totals(root: Path) -> str:
    lines = [
        "| variant | seed | intruders in top 10 (ε = 0.5), all layers | layers with any |",
        "|---|---|---|---|",
    ]
    for name in ("kaiming", "rslora_r64", "full_finetune"):
        for report in sorted(root.glob(f"intruders_{name}-s*.md")):
            text = report.read_text()
            total = re.search(r": (\d+) in (\d+) updates", text)
            rows = [line for line in text.splitlines() if line.startswith("| model.")]
            with_any = sum(1 for line in rows if int(line.rstrip(" |").split("|")[-1]) > 0)
            seed = report.stem.rsplit("-s", 1)[1]
            lines.append(f"| {name} | {seed} | {total.group(1)} of {total.group(2)} layers | {with_any} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--figure", type=Path, default=Path("docs/images/inits_loss_curves.png"))
    args = parser.parse_args()
    root = args.root
    print("## inits\n" + score_table(root, ["kaiming", "pissa", "eva", "lora_ga"]))
    print("\n## optimisers\n" + score_table(root, ["kaiming", "lora_pro", "lora_pro_lr1e-3", "allora"]))
    print(
        "\n## MoLE experts\n"
        + score_table(
            root,
            ["mole_kaiming", "mole_eva"],
            {"router entropy": router_entropy, "expert |cos|": expert_similarity},
        )
    )
    print("\n## DyLoRA\n" + dylora_table(root))
    print("\n## intruder dimensions\n" + intruder_totals(root))
    loss_figure(root, ["kaiming", "pissa", "eva", "lora_ga", "lora_pro", "allora"], args.figure)
    print(f"\nfigure: {args.figure}")


if __name__ == "__main__":
    main()

"""The reward curves of docs/rl.md: LoRA against MoLE policies, GRPO against Dr. GRPO, and ours
against TRL, from the runs of `bash scripts/rl_results.sh` and `make bench-rl`.

python scripts/rl_curves.py runs/rl_results [--trl runs/grpo_vs_trl-s0.json runs/grpo_vs_trl-s1.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

WINDOW = 5  # steps in the running mean: one rollout's reward is a noisy mean of 32 samples


def running_mean(values: list[float]) -> np.ndarray:
    kernel = np.ones(WINDOW) / WINDOW
    return np.convolve(values, kernel, mode="valid")


def rewards(run: Path) -> list[float]:
    return [event.value for event in EventAccumulator(str(run)).Reload().Scalars("train/reward")]


def plot(axes, curves: dict[str, list[float]], title: str) -> None:
    for label, values in curves.items():
        if len(values) >= WINDOW:
            axes.plot(np.arange(WINDOW, len(values) + 1), running_mean(values), label=label)
    axes.set(xlabel="training step", ylabel=f"reward ({WINDOW}-step running mean)", title=title)
    axes.legend(fontsize=8)


def seeds(root: Path, name: str) -> dict[str, list[float]]:
    return {f"{name} seed {run.name[1:]}": rewards(run) for run in sorted((root / name).glob("s*"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument(
        "--trl", type=Path, nargs="+", default=sorted(Path("runs").glob("grpo_vs_trl-s*.json"))
    )
    parser.add_argument("--figure", type=Path, default=Path("docs/images/rl_reward_curves.png"))
    args = parser.parse_args()
    side_by_side = {
        f"{side} seed {path.stem.rsplit('-s', 1)[1]}": rewards
        for path in args.trl
        for side, rewards in json.loads(path.read_text()).items()
    }
    # the benchmark's side of ours runs the default config, so its curve stands in for a LoRA
    # seed without a run of its own here (the same seed gives the same rewards, step for step)
    lora = seeds(args.root, "lora")
    for name, rewards in side_by_side.items():
        label = "lora seed " + name.rsplit(" ", 1)[1]
        if name.startswith("ours") and label not in lora:
            lora[f"{label} (bench-rl, 30 steps)"] = rewards
    figure = Figure(figsize=(15, 4), layout="constrained")
    left, middle, right = figure.subplots(1, 3, sharey=True)
    plot(left, lora | seeds(args.root, "mole"), "LoRA and MoLE policies (GRPO)")
    plot(middle, lora | seeds(args.root, "dr_grpo"), "GRPO and Dr. GRPO (dr_grpo), LoRA policy")
    plot(right, side_by_side, "ours and TRL, LoRA policy, same prompts")
    figure.savefig(args.figure, dpi=100)
    print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()

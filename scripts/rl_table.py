"""The training-step table of docs/rl.md from a GRPO run's TensorBoard events.

python scripts/rl_table.py runs/rl/grpo_smollm2/version_0   # then validation and routing, first and last
"""

from __future__ import annotations

import sys

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

TAGS = ["reward", "accuracy", "format_rate", "kl", "equal_reward_groups", "entropy"]

events = EventAccumulator(sys.argv[1]).Reload()
values = {tag: np.array([e.value for e in events.Scalars(f"train/{tag}")]) for tag in TAGS}
print("| training steps | " + " | ".join(TAGS) + " |")
print("|---|" + "---:|" * len(TAGS))
for start in range(0, len(values["reward"]), 10):
    cells = [f"{values[tag][start : start + 10].mean():.3f}" for tag in TAGS]
    print(f"| {start + 1}–{min(start + 10, len(values['reward']))} | " + " | ".join(cells) + " |")
times = [e.wall_time for e in events.Scalars("train/reward")]
print(f"\nseconds per step (median): {np.median(np.diff(times)):.1f}")
for tag in (
    "val/verifier_score",
    "val/strict_match",
    "routing/entropy",
    "routing/max_load",
    "routing/dead_experts",
):
    if tag in events.Tags()["scalars"]:
        scores = events.Scalars(tag)
        print(
            f"{tag}: {scores[0].value:.3f} (step {scores[0].step}) -> {scores[-1].value:.3f} (step {scores[-1].step})"
        )

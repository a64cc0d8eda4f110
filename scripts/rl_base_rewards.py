"""How often the base model's sampled completions earn a reward, per reasoning-gym task: what
docs/rl.md picked the embedded default's tasks and answer extraction by.

    python scripts/rl_base_rewards.py chain_sum letter_counting basic_arithmetic

One rollout of 16 prompts x 8 completions (24 new tokens, temperature 1) of SmolLM2-135M-Instruct
without adapters, scored with the marked answer and with the last number.
"""

from __future__ import annotations

import sys

from lightning_moe.data.verified_prompts import VerifiedPrompts
from lightning_moe.tasks.reasoning import GRPOTask
from lightning_moe.tasks.reasoning.policy_gradient import group_advantages
from lightning_moe.tasks.reasoning.rewards import score_completions

OPTIONS = {  # the demo's difficulty
    "chain_sum": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2},
    "letter_counting": {"min_words": 3, "max_words": 4},
}
GROUP, PROMPTS = 8, 16

for name in sys.argv[1:] or list(OPTIONS):
    data = VerifiedPrompts(
        tasks=[name],
        task_options={name: OPTIONS.get(name, {})},
        instruction="Reply with only the final answer, as '#### <answer>'.",
        train_size=PROMPTS,
        val_size=4,
        test_size=4,
        batch_size=PROMPTS,
    )
    data.setup("fit")
    task = GRPOTask(data=data, model="smollm2-135m-instruct", max_new_tokens=24, group_size=GROUP)
    task.configure_model()
    batch = next(iter(data.train_dataloader()))
    rollout = task.rollout(batch)
    entries = [entry for entry in batch["entry"] for _ in range(GROUP)]
    for extraction in ("marked", "last_number"):
        rewards = score_completions(
            rollout["texts"],
            [name] * len(entries),
            entries,
            rollout["prompt_text"],
            data.verifier(),
            0.0,
            extraction,
        )
        _, equal = group_advantages(rewards.correct, GROUP, scale=False)
        print(
            f"{name} {extraction}: correct {float(rewards.correct.mean()):.3f}, format rate "
            f"{float(rewards.formatted.mean()):.3f}, groups with a signal {1 - float(equal.float().mean()):.2f}"
        )

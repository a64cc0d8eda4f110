"""Prompts whose answers a verifier scores: reasoning-gym problems for reinforcement learning.

`VerifiedPrompts` is `MathDataModule` with prompt-only training batches (left-padded for
generation, each with its reasoning-gym item) and a `verifier`: each task's own `score_answer`,
built with the same options the problems were generated with. Files (GSM8K jsonl) have no
verifier, so they are refused.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from torch.utils.data import DataLoader

from lightning_moe.data.collate import collate_prompt_completion
from lightning_moe.data.math_problems import MathDataModule
from lightning_moe.data.sampling import resumed_training_sampler
from lightning_moe.errors import UserInputError

Verifier = Callable[[str, str | None, dict], float]  # (task, extracted answer, item) -> reward in [0, 1]


class VerifiedPrompts(MathDataModule):
    """reasoning-gym prompts for GRPO: training batches hold `batch_size` prompts (`prompt_ids`,
    `prompt_mask`, `prompt_text`, `reference`, `entry`, `domain`); validation and test are
    `MathDataModule`'s.

    Args:
        **kwargs: As `MathDataModule` (tasks, task_options, sizes, seeds, instruction, batch
            sizes), except the `*_file` options, which give problems without a verifier.
    """

    def __init__(self, **kwargs: Any) -> None:
        for name in ("train_file", "val_file", "test_file"):
            if kwargs.get(name) is None:
                continue
            raise UserInputError(
                f"{name}={kwargs[name]!r}: VerifiedPrompts scores answers with reasoning-gym's verifiers, and a "
                "problem file has none; generate the problems from `tasks` instead"
            )
        super().__init__(**kwargs)
        self._scorers: dict[str, Callable[[str | None, dict], float]] = {}

    def _loader(self, split: str) -> DataLoader:
        if split != "train":
            return super()._loader(split)
        examples = self.splits["train"]
        collate = partial(
            collate_prompt_completion,
            pad_token_id=self.tokenizer.pad_token_id,
            for_generation=True,
            pad_to_multiple_of=self.pad_to_multiple_of,
        )
        sampler = resumed_training_sampler(self, len(examples), 0, self.batch_size)
        return DataLoader(examples, batch_size=self.batch_size, sampler=sampler, collate_fn=collate)

    def verifier(self) -> Verifier:
        """score(task, answer, entry): the task's reasoning-gym `score_answer`."""
        import reasoning_gym

        for task in self.tasks:
            if task not in self._scorers:
                dataset = reasoning_gym.create_dataset(
                    task, size=1, seed=0, **self.task_options.get(task, {})
                )
                self._scorers[task] = dataset.score_answer
        return lambda task, answer, entry: self._scorers[task](answer, entry)

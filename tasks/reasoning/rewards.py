"""Verifiable rewards for sampled completions: the task's verifier on the final answer, plus an
optional format reward; a verifier that fails or returns a non-number stops the run with the
task and the sample named.

The answer is read from a completion in one of two ways (`AnswerExtraction`):
- "marked": the rest of the line after the last `#### ` (the format the prompts ask for), as
  text; reasoning-gym's verifiers normalise it themselves (numbers, words, lists);
- "last_number": the last number anywhere in the completion (GSM8K's flexible extract), for
  numeric tasks on a model that does not yet write the format (the format reward teaches it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_moe.data.math_problems import ANSWER_MARKER
from lightning_moe.data.verified_prompts import Verifier
from lightning_moe.errors import UserInputError
from lightning_moe.tasks.reasoning.answer_match import extract_answer

AnswerExtraction = Literal["marked", "last_number"]


def final_answer(completion: str) -> str | None:
    """The text after the last `#### ` up to the end of its line (None: no such line)."""
    if ANSWER_MARKER not in completion:
        return None
    answer = completion.rsplit(ANSWER_MARKER, 1)[1].split("\n", 1)[0].strip()
    return answer or None


@dataclass
class Rewards:
    """Per completion: `total` = `correct` + format_weight * `formatted`."""

    total: Tensor
    correct: Tensor  # the verifier's score in [0, 1]
    formatted: Tensor  # 1 where the completion gives a `#### <answer>` line


def _checked(task: str, sample: int, prompt: str, completion: str, value: object) -> float:
    where = f"the verifier of task {task!r} on sample {sample} (prompt {prompt[:60]!r}, completion {completion[:60]!r})"
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UserInputError(f"{where} returned {value!r}; expected a finite number in [0, 1]")
    if not 0.0 <= value <= 1.0:
        raise UserInputError(f"{where} returned {value}; expected a number in [0, 1]")
    return float(value)


def score_completions(
    completions: Sequence[str],
    tasks: Sequence[str],
    entries: Sequence[dict],
    prompts: Sequence[str],
    verifier: Verifier,
    format_weight: float,
    extraction: AnswerExtraction = "marked",
) -> Rewards:
    """Rewards of completions, each with its own task, reasoning-gym item and prompt."""
    correct, formatted = [], []
    for sample, (completion, task, entry, prompt) in enumerate(
        zip(completions, tasks, entries, prompts, strict=True)
    ):
        answer = (
            final_answer(completion) if extraction == "marked" else extract_answer(completion, "flexible")
        )
        try:
            value = verifier(task, answer, entry)
        except Exception as error:  # any verifier bug is the user's to see, with the sample
            raise UserInputError(
                f"the verifier of task {task!r} failed on sample {sample} (prompt {prompt[:60]!r}, "
                f"answer {answer!r}): {type(error).__name__}: {error}"
            ) from None
        correct.append(_checked(task, sample, prompt, completion, value))
        formatted.append(float(final_answer(completion) is not None))
    correct_t, formatted_t = torch.tensor(correct), torch.tensor(formatted)
    return Rewards(correct_t + format_weight * formatted_t, correct_t, formatted_t)

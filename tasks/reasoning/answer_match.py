"""Scoring generated math solutions the way GSM8K evaluations do.

Strict match reads the number after the first `#### `; flexible extract reads the last number
anywhere in the output. Both strip `,` and `$` and a trailing `.` and then compare as decimal
numbers, so "1,000." matches "1000" and "18.0" matches "18".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from typing import Literal

import torch
from torchmetrics import Metric

Extraction = Literal["strict", "flexible"]
STRICT_PATTERN = re.compile(r"#### (-?[$0-9.,]+)")
# a run of at least two number characters, or a single digit; optional leading minus
NUMBER_PATTERN = re.compile(r"-?[$0-9.,]{2,}|-?[0-9]")


def normalize_number(text: str) -> str:
    return text.strip().replace(",", "").replace("$", "").removesuffix(".")


def extract_answer(output: str, extraction: Extraction) -> str | None:
    """The answer a generation gives under the `strict` or `flexible` rule (None: no answer)."""
    if extraction == "strict":
        match = STRICT_PATTERN.search(output)
        return normalize_number(match.group(1)) if match else None
    numbers = [normalize_number(n) for n in NUMBER_PATTERN.findall(output)]
    numbers = [n for n in numbers if any(c.isdigit() for c in n)]
    return numbers[-1] if numbers else None


def answers_match(predicted: str | None, reference: str) -> bool:
    if predicted is None:
        return False
    reference = normalize_number(reference)
    try:
        return Decimal(predicted) == Decimal(reference)
    except InvalidOperation:
        return predicted == reference


class MatchRate(Metric):
    """Fraction of generations that `matches` their reference; subclasses define the match."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def matches(self, output: str, reference: str) -> bool:
        raise NotImplementedError

    def update(self, outputs: Sequence[str], references: Sequence[str]) -> None:
        self.correct += sum(self.matches(out, ref) for out, ref in zip(outputs, references, strict=True))
        self.total += len(outputs)

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.total.clamp(min=1)


class AnswerMatch(MatchRate):
    """Fraction of generations whose extracted answer equals the reference answer.

    Args:
        extraction: "strict" (number after `#### `) or "flexible" (last number in the output).
    """

    def __init__(self, extraction: Extraction = "strict", **kwargs) -> None:
        super().__init__(**kwargs)
        self.extraction = extraction

    def matches(self, output: str, reference: str) -> bool:
        return answers_match(extract_answer(output, self.extraction), reference)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation at the ends, no leading article, single spaces: 'A Sneaker.' -> 'sneaker'."""
    words = text.lower().strip().strip(".!?,;:'\"").split()
    if words and words[0] in ("a", "an", "the"):
        words = words[1:]
    return " ".join(words)


class NormalizedMatch(MatchRate):
    """Fraction of generations equal to the reference after `normalize_answer` (short answers such
    as 'sneaker', 'local defect' or '7')."""

    def matches(self, output: str, reference: str) -> bool:
        return normalize_answer(output) == normalize_answer(reference)

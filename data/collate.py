"""Batching for prompt/completion language data: pad to the longest sequence in the batch (or up
to a multiple of a length, so a compiled model sees few distinct shapes), and let the loss see
only completion tokens (labels = -100 elsewhere)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class PromptCompletion:
    """One tokenised example.

    `domain` names its source task (for per-domain metrics); `prompt_text`, `reference` (the
    expected answer) and `entry` (the generator's item, for its verifier) travel with evaluation
    batches for scoring and prediction files.
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    domain: str = ""
    prompt_text: str = ""
    reference: str = ""
    entry: dict | None = None


def pad_rows(
    rows: Sequence[list[int]], value: int, left: bool = False, multiple_of: int | None = None
) -> torch.Tensor:
    """Stack token rows into one tensor, padded with `value` on the right (or left) to the
    longest row, rounded up to a multiple of `multiple_of` if given."""
    longest = max(len(row) for row in rows)
    if multiple_of:
        longest = -(-longest // multiple_of) * multiple_of
    padded = torch.full((len(rows), longest), value, dtype=torch.long)
    for index, row in enumerate(rows):
        start = longest - len(row) if left else 0
        padded[index, start : start + len(row)] = torch.tensor(row, dtype=torch.long)
    return padded


def collate_prompt_completion(
    examples: Sequence[PromptCompletion],
    pad_token_id: int,
    max_length: int | None = None,
    for_generation: bool = False,
    pad_to_multiple_of: int | None = None,
) -> dict:
    """Right-padded `input_ids`, `attention_mask` and `labels` (completion tokens only), with
    lengths rounded up to `pad_to_multiple_of` if given.

    With `for_generation`, also the prompts alone, LEFT-padded as generation needs
    (`prompt_ids`, `prompt_mask`), with their texts, reference answers and generator items.
    """
    sequences, labels = [], []
    for example in examples:
        ids = example.prompt_ids + example.completion_ids
        target = [IGNORE_INDEX] * len(example.prompt_ids) + example.completion_ids
        if max_length is not None:
            ids, target = ids[:max_length], target[:max_length]
        sequences.append(ids)
        labels.append(target)
    multiple = pad_to_multiple_of
    batch = {
        "input_ids": pad_rows(sequences, pad_token_id, multiple_of=multiple),
        "attention_mask": pad_rows([[1] * len(ids) for ids in sequences], 0, multiple_of=multiple),
        "labels": pad_rows(labels, IGNORE_INDEX, multiple_of=multiple),
        "domain": [example.domain for example in examples],
    }
    if for_generation:
        prompts = [example.prompt_ids for example in examples]
        batch["prompt_ids"] = pad_rows(prompts, pad_token_id, left=True, multiple_of=multiple)
        batch["prompt_mask"] = pad_rows(
            [[1] * len(ids) for ids in prompts], 0, left=True, multiple_of=multiple
        )
        batch["prompt_text"] = [example.prompt_text for example in examples]
        batch["reference"] = [example.reference for example in examples]
        batch["entry"] = [example.entry for example in examples]
    return batch

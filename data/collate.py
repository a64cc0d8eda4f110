"""Batching for prompt/completion language data: pad to the longest sequence in the batch, and
let the loss see only completion tokens (labels = -100 elsewhere)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class PromptCompletion:
    """One tokenised example; `domain` names its source task (for per-domain metrics)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    domain: str = ""


def collate_prompt_completion(
    examples: Sequence[PromptCompletion], pad_token_id: int, max_length: int | None = None
) -> dict:
    """Right-padded `input_ids`, `attention_mask` and `labels` (completion tokens only)."""
    sequences, labels = [], []
    for example in examples:
        ids = example.prompt_ids + example.completion_ids
        target = [IGNORE_INDEX] * len(example.prompt_ids) + example.completion_ids
        if max_length is not None:
            ids, target = ids[:max_length], target[:max_length]
        sequences.append(ids)
        labels.append(target)
    longest = max(len(ids) for ids in sequences)
    batch_ids = torch.full((len(sequences), longest), pad_token_id, dtype=torch.long)
    batch_labels = torch.full((len(sequences), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, (ids, target) in enumerate(zip(sequences, labels, strict=True)):
        batch_ids[row, : len(ids)] = torch.tensor(ids)
        batch_labels[row, : len(target)] = torch.tensor(target)
        attention_mask[row, : len(ids)] = 1
    return {
        "input_ids": batch_ids,
        "attention_mask": attention_mask,
        "labels": batch_labels,
        "domain": [example.domain for example in examples],
    }

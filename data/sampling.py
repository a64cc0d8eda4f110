"""Shuffling that a resumed run reproduces exactly."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochSeededSampler(Sampler[int]):
    """A random permutation drawn from (seed, epoch) alone.

    Lightning calls `set_epoch` at the start of every epoch, also after `fit --ckpt_path`, so a
    resumed run sees the same order as an uninterrupted one (a plain shuffle would not: its
    order depends on the global RNG history).
    """

    def __init__(self, length: int, seed: int = 0) -> None:
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length

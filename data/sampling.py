"""Shuffling that a resumed run reproduces exactly."""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
import torch
from torch.utils.data import Sampler


class EpochSeededSampler(Sampler[int]):
    """A random permutation drawn from (seed, epoch) alone, optionally skipping its first items.

    Lightning calls `set_epoch` at the start of every epoch, also after `fit --ckpt_path`, so a
    resumed run sees the same order as an uninterrupted one (a plain shuffle would not: its
    order depends on the global RNG history). `skip` drops the items a resumed epoch already
    trained on, once.
    """

    def __init__(self, length: int, seed: int = 0, epoch: int = 0, skip: int = 0) -> None:
        self.length = length
        self.seed = seed
        self.epoch = epoch
        self.skip = skip

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.length, generator=generator).tolist()[self.skip :]
        self.skip = 0
        return iter(order)

    def __len__(self) -> int:
        return self.length


def resumed_training_sampler(datamodule: L.LightningDataModule, length: int, seed: int, batch_size: int):
    """An `EpochSeededSampler` positioned where Lightning's restored training loop continues.

    After `fit --ckpt_path`, Lightning restores its epoch and the number of batches of that epoch
    it already fetched; skipping those keeps a mid-epoch resume on the uninterrupted data order.
    """
    trainer = datamodule.trainer
    if trainer is None or not trainer.fit_loop.restarting:
        return EpochSeededSampler(length, seed)
    fetched = trainer.fit_loop.epoch_loop.batch_progress.current.ready
    return EpochSeededSampler(length, seed, epoch=trainer.current_epoch, skip=fetched * batch_size)

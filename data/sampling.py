"""Shuffling that a resumed run reproduces exactly, on one process or many."""

from __future__ import annotations

import math
from collections.abc import Iterator

import lightning as L
import torch
from torch.utils.data import DistributedSampler


class EpochSeededSampler(DistributedSampler):
    """A random permutation drawn from (seed, epoch) alone; each of `num_replicas` processes
    takes every num_replicas-th item of it, optionally skipping the first items of its share.

    Lightning calls `set_epoch` at the start of every epoch, also after `fit --ckpt_path`, so a
    resumed run sees the same order as an uninterrupted one (a plain shuffle would not: its
    order depends on the global RNG history). `skip` drops the items of this process's share
    that a resumed epoch already trained on, once. Being a `DistributedSampler`, it is kept
    as it is in distributed runs (Lightning would otherwise wrap it and lose the skip); like
    torch's, it wraps around so that every process gets the same number of items.
    """

    def __init__(
        self, length: int, seed: int = 0, epoch: int = 0, skip: int = 0, num_replicas: int = 1, rank: int = 0
    ) -> None:
        super().__init__(range(length), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.length = length
        self.epoch = epoch
        self.skip = skip

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.length, generator=generator).tolist()
        share_size = len(self)
        order += order[: share_size * self.num_replicas - self.length]
        share = order[self.rank :: self.num_replicas][self.skip :]
        self.skip = 0
        return iter(share)

    def __len__(self) -> int:
        return math.ceil(self.length / self.num_replicas)


def resumed_training_sampler(datamodule: L.LightningDataModule, length: int, seed: int, batch_size: int):
    """An `EpochSeededSampler` for this process, positioned where Lightning's restored training
    loop continues.

    After `fit --ckpt_path`, Lightning restores its epoch and the number of batches of that epoch
    it already fetched; skipping those keeps a mid-epoch resume on the uninterrupted data order.
    """
    trainer = datamodule.trainer
    if trainer is None:
        return EpochSeededSampler(length, seed)
    # DDP and FSDP2 strategies say which share of the data this process reads
    replicas = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
    if not trainer.fit_loop.restarting:
        return EpochSeededSampler(length, seed, **replicas)
    fetched = trainer.fit_loop.epoch_loop.batch_progress.current.ready
    return EpochSeededSampler(length, seed, trainer.current_epoch, fetched * batch_size, **replicas)

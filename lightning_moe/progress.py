"""Progress a person can follow in a terminal and in a log file.

In a terminal the training and evaluation loops use Rich bars (`StepProgressBar`); when stderr
is not a terminal (CI, `nohup`, `| tee`) Rich draws nothing until the end, so `ProgressLines`
prints one line now and then instead. Preparation steps outside the loops (a model conversion, a
dataset fetch, the suite's runs) report through `stage`, which prints one line when the step
starts and one when it ends, with the time taken.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.utilities.rank_zero import rank_zero_only


def is_terminal() -> bool:
    return sys.stderr.isatty()


def _say(text: str) -> None:
    if rank_zero_only.rank == 0:
        print(text, file=sys.stderr, flush=True)


@contextmanager
def stage(description: str) -> Iterator[None]:
    """`description...` when the step starts and `description: done in 12 s` when it ends."""
    _say(f"{description} ...")
    start = time.perf_counter()
    yield
    _say(f"{description}: done in {time.perf_counter() - start:.0f} s")


class StepProgressBar(RichProgressBar):
    """Lightning's Rich bar, except that a run bounded by steps rather than epochs says so
    ("Training, step limit 40") instead of "Epoch 0/-2"."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_epochs in (None, -1) and trainer.max_steps > 0:
            return f"Training, step limit {trainer.max_steps}"
        return super()._get_train_description(current_epoch)


@dataclass
class _Loop:
    """One loop's counters for `ProgressLines` (training keeps its own while validation runs)."""

    name: str
    total: int
    done: int = 0
    reported: int = 0
    started: float = field(default_factory=time.perf_counter)
    last: float = field(default_factory=time.perf_counter)


class ProgressLines(ProgressBar):
    """The progress bar for output that is not a terminal: a line about every `every_seconds`
    (and at the end of each loop) with the batch count, elapsed time and an estimate of what is
    left, plus the last logged loss while training."""

    def __init__(self, every_seconds: float = 20.0) -> None:
        super().__init__()
        self.every_seconds = every_seconds
        self._enabled = True
        self._training: _Loop | None = None
        self._evaluating: _Loop | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _begin(self, trainer: L.Trainer, name: str, total: int) -> _Loop:
        if self._enabled and trainer.is_global_zero:
            _say(f"{name}: {total or '?'} batches")
        return _Loop(name, total)

    def _advance(
        self, trainer: L.Trainer, loop: _Loop | None, done: int | None = None, final: bool = False
    ) -> None:
        if loop is None:
            return
        loop.done = loop.done + 1 if done is None else done
        now = time.perf_counter()
        due = now - loop.last >= self.every_seconds or (final and loop.done != loop.reported)
        if not (self._enabled and trainer.is_global_zero and due):
            return
        loop.last, loop.reported = now, loop.done
        elapsed = now - loop.started
        line = f"{loop.name}: {loop.done}/{loop.total or '?'} batches, {elapsed:.0f} s"
        if 0 < loop.done < loop.total:
            line += f", about {elapsed / loop.done * (loop.total - loop.done):.0f} s left"
        loss = trainer.callback_metrics.get("train/loss")
        if loop is self._training and loss is not None:
            line += f", train/loss {float(loss):.4f}"
        _say(line)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._training = self._begin(trainer, "training", _training_steps(trainer, self.total_train_batches))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._advance(trainer, self._training, done=trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._advance(trainer, self._training, done=trainer.global_step, final=True)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sanity = trainer.sanity_checking
        name = "scoring before training (sanity check)" if sanity else "validation"
        batches = trainer.num_sanity_val_batches if sanity else trainer.num_val_batches
        self._evaluating = self._begin(trainer, name, _total(batches))

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._advance(trainer, self._evaluating)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._advance(trainer, self._evaluating, done=self._evaluating.done, final=True)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._evaluating = self._begin(trainer, "test", _total(trainer.num_test_batches))

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._advance(trainer, self._evaluating)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._advance(trainer, self._evaluating, done=self._evaluating.done, final=True)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._evaluating = self._begin(trainer, "predict", _total(trainer.num_predict_batches))

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._advance(trainer, self._evaluating)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._advance(trainer, self._evaluating, done=self._evaluating.done, final=True)


def _training_steps(trainer: L.Trainer, batches_per_epoch: float | int) -> int:
    """The optimizer steps the run will take (progress counts `global_step`): the fewer of
    max_steps and max_epochs' worth; 0 when neither bounds it."""
    per_epoch = math.ceil(_finite(batches_per_epoch) / trainer.accumulate_grad_batches)
    limits = [trainer.max_steps] if trainer.max_steps > 0 else []
    if trainer.max_epochs not in (None, -1) and per_epoch:
        limits.append(per_epoch * trainer.max_epochs)
    return min(limits, default=0)


def _total(batches_per_loader: list[float | int]) -> int:
    return sum(_finite(count) for count in batches_per_loader)


def _finite(total: float | int) -> int:
    return int(total) if total != float("inf") else 0


def default_progress_bar() -> ProgressBar:
    """The bar the CLI gives a run that asks for no other: Rich in a terminal, lines elsewhere."""
    return StepProgressBar() if is_terminal() else ProgressLines()

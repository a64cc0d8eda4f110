"""Callbacks of the continual domain: CoDyRA's gate schedule (`ContinualClipTask(rank_gate_penalty=...)`
adds it with the stream's task length) and the suite's progress line per run."""

from __future__ import annotations

import time

import lightning as L
from rich.console import Console
from rich.markup import escape

from lightning_moe.adapters.codyra import rank_gated_layers, soft_threshold_rank_gates
from lightning_moe.errors import UserInputError


class RankGateShrinkage(L.Callback):
    """CoDyRA's sparsity schedule: after every optimizer step, soft-threshold every rank gate by
    lr x penalty_t, where penalty_t rises linearly from 0 to `penalty` over each task. Early steps
    learn freely; later steps prune the ranks the task does not need.

    Args:
        penalty: The L1 penalty on the gates at the end of a task.
        epochs_per_task: Epochs of one task (None: the whole fit is one task).
    """

    def __init__(self, penalty: float = 1.0, epochs_per_task: int | None = None) -> None:
        if penalty < 0:
            raise UserInputError(f"penalty must be >= 0, got {penalty}")
        self.penalty = penalty
        self.epochs_per_task = epochs_per_task

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        batches = trainer.num_training_batches
        if (batch_idx + 1) % trainer.accumulate_grad_batches and batch_idx + 1 != batches:
            return  # no optimizer step after this batch
        epochs = self.epochs_per_task or trainer.max_epochs
        progress = ((trainer.current_epoch % epochs) * batches + batch_idx + 1) / (epochs * batches)
        soft_threshold_rank_gates(pl_module, gate_learning_rate(trainer, pl_module) * self.penalty * progress)


def gate_learning_rate(trainer: L.Trainer, pl_module: L.LightningModule) -> float:
    """The learning rate of the parameter group that trains the rank gates (the proximal step
    scales with it)."""
    gates = {id(layer.adapter.rank_gates) for _, layer in rank_gated_layers(pl_module)}
    groups = trainer.optimizers[0].param_groups
    return next((g["lr"] for g in groups if any(id(p) in gates for p in g["params"])), groups[0]["lr"])


class SuiteRunProgress(L.Callback):
    """One line per task of a suite run, and one when it ends: which run ("[run 2/6] lora seed 1"),
    which task of the stream, and how the last task scored.

    Args:
        run: This run's number in the suite (from 1).
        runs: How many runs the suite has.
        method: The method's name in the suite config.
        seed: The run's seed.
    """

    def __init__(self, run: int, runs: int, method: str, seed: int) -> None:
        self.label = f"[run {run}/{runs}] {method} seed {seed}"
        self.started = 0.0

    def _say(self, trainer: L.Trainer, text: str) -> None:
        if trainer.is_global_zero:
            line = f"[bold]{escape(self.label)}[/bold]: {escape(text)}, {time.perf_counter() - self.started:.0f} s"
            Console(stderr=True).print(line, soft_wrap=True)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stream, epoch = pl_module.stream, trainer.current_epoch
        if epoch % stream.epochs_per_task:
            return
        task = stream.task_of_epoch(epoch)
        self._say(
            trainer, f"task {task + 1}/{len(stream.tasks)} ({stream.tasks[task].name}){_last_row(pl_module)}"
        )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._say(trainer, f"done{_last_row(pl_module)}")


def _last_row(pl_module: L.LightningModule) -> str:
    record = pl_module.record
    if record is None or not record.matrix:
        return ""
    learned = len(record.matrix)
    row = record.matrix[-1]
    seen = sum(row[:learned]) / learned
    return f"; after {record.tasks[learned - 1]}: {100 * row[learned - 1]:.0f}% on it, {100 * seen:.0f}% mean over seen tasks"

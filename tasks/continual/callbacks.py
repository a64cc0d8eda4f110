"""CoDyRA's gate schedule as a callback; `ContinualClipTask(rank_gate_penalty=...)` adds it with
the stream's task length."""

from __future__ import annotations

import lightning as L

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

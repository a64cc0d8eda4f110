"""`TaskModule`: the LightningModule every task builds on, with or without adapters.

A task says what its model is (`build_model`) and what its loss is (`task_loss`). The base does
the rest the same way for all of them: `configure_model` builds the model once (idempotent),
prepares it (`AdapterModule` injects adapters here), shards it under FSDP2 and optionally
compiles it; every step logs `<stage>/loss` and stops the run at a non-finite loss term or
gradient; Lightning checkpoints hold the trainable state only; `export` writes what the task
produced (the `ExportAdapter` callback calls it at the end of `fit`).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_moe.errors import UserInputError
from lightning_moe.lora_optimizers import low_rank_pairs
from lightning_moe.non_finite import (
    check_finite_state,
    stop_on_non_finite_gradients,
    stop_on_non_finite_terms,
)
from lightning_moe.parallel import data_parallel_mesh, mixed_precision_policy, shard_model


def _adamw(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)


class TaskModule(L.LightningModule):
    """Base task: subclasses implement `build_model()` and `task_loss(batch)`.

    Args:
        optimizer: Optimizer factory, called with the parameter groups (`parameter_groups`).
        scheduler: Optional learning-rate scheduler factory (stepped every optimizer step).
        compile: Compile the model in `configure_model`, after sharding (nn.Module.compile:
            parameter names and checkpoints are unchanged).
    """

    def __init__(
        self,
        optimizer: OptimizerCallable = _adamw,
        scheduler: LRSchedulerCallable | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.compile_model = compile
        self.model: nn.Module | None = None

    # --- what a task provides -------------------------------------------------------------
    def build_model(self) -> nn.Module:
        """Build (or load) the model."""
        raise NotImplementedError

    def task_loss(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        """Return the task loss and the token mask [batch, tokens] of the real tokens (or None)."""
        raise NotImplementedError

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Modules that train whole and are checkpointed, by their name in this module (e.g.
        "model.projector"); everything else of the model stays frozen."""
        return {}

    def tensorboard_layout(self) -> dict[str, dict[str, list[str]]]:
        """Custom-scalars categories of this task's own metrics ({category: {chart title: tag
        regexes}}), added to the shell's (`lightning_moe.tensorboard_views.LAYOUT`)."""
        return {}

    def export(self, folder: str, base_model: str = "", overwrite: bool = False) -> None:
        """Write what this task produced to `folder` (every process calls it: a sharded model
        gathers its tensors; one process writes)."""
        raise UserInputError(f"{type(self).__name__} has nothing to export; drop the ExportAdapter callback")

    # --- model life cycle -----------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        model = self.build_model().train()  # from_pretrained returns eval mode; dropout needs train
        self.model = model
        self.prepare_model(model)
        for module in self.trainable_modules().values():
            module.requires_grad_(True)
        if self.device_mesh is not None:  # ModelParallelStrategy / FSDP2Strategy
            mesh = data_parallel_mesh(self.device_mesh)
            shard_model(model, mesh, mixed_precision_policy(self.trainer.strategy), self.sharded_units())
        if self.compile_model:
            model.compile()
        for name, module in self.trainable_modules().items():
            rank_zero_info(f"training {name} ({sum(p.numel() for p in module.parameters()):,} parameters)")

    def prepare_model(self, model: nn.Module) -> None:
        """After building, before the trainable modules are unfrozen and the model sharded: where
        a subclass changes the model (AdapterModule injects its adapters and freezes the rest)."""

    def sharded_units(self) -> list[nn.Module]:
        """Modules to shard as their own FSDP2 units before the model's blocks (adapters)."""
        return []

    # --- steps ----------------------------------------------------------------------------
    def loss_terms(self, batch: Any) -> tuple[dict[str, tuple[float, Tensor]], Tensor | None]:
        """{name: (coefficient, value)} of the loss terms of a batch, and its token mask."""
        task_loss, token_mask = self.task_loss(batch)
        return {"task_loss": (1.0, task_loss)}, token_mask

    def _step(self, batch: Any, stage: str) -> Tensor:
        terms, token_mask = self.loss_terms(batch)
        if stage == "train":
            stop_on_non_finite_terms(self, {name: value for name, (_, value) in terms.items()})
        log = partial(
            self.log,
            sync_dist=stage != "train",
            batch_size=token_mask.shape[0] if token_mask is not None else None,
        )
        for name, (_, value) in terms.items():
            log(f"{stage}/{name}", value, prog_bar=stage == "train" and name == "task_loss")
        loss = sum(coefficient * value for coefficient, value in terms.values())
        log(f"{stage}/loss", loss, prog_bar=True)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # with a loss scaler (fp16) an infinite gradient is expected now and then: the scaler skips that step
        if getattr(self.trainer.precision_plugin, "scaler", None) is None:
            stop_on_non_finite_gradients(
                self, (p for group in optimizer.param_groups for p in group["params"])
            )

    # --- optimisation ---------------------------------------------------------------------
    def parameter_groups(self) -> list[dict]:
        """The optimizer's parameter groups: one of every trainable parameter here."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "name": "trainable"}]

    def configure_optimizers(self):
        groups = [group for group in self.parameter_groups() if group["params"]]
        if not groups:
            raise UserInputError(
                f"{type(self).__name__} has nothing to train: give it adapters, an adapter_path, or "
                "modules that train"
            )
        try:
            optimizer = self.optimizer_factory(groups)
        except (ValueError, TypeError) as error:  # e.g. torch's "Invalid learning rate: nan"
            raise UserInputError(f"the optimizer refuses its settings: {error}") from None
        if hasattr(optimizer, "bind_low_rank_pairs"):  # LoRA-Pro, ALLoRA: which parameters pair up
            optimizer.bind_low_rank_pairs(low_rank_pairs(self.model))
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- checkpoints: the trainable state only -----------------------------------------------
    def checkpoint_keys(self) -> set[str]:
        """The state_dict keys a checkpoint keeps: trainable parameters, and all of each module
        in `trainable_modules` (its buffers too)."""
        keys = {name for name, parameter in self.named_parameters() if parameter.requires_grad}
        for module_name, module in self.trainable_modules().items():
            keys |= {f"{module_name}.{key}" for key in module.state_dict()}
        return keys

    def state_dict(self, *args, **kwargs) -> dict[str, Tensor]:
        full = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        keep = self.checkpoint_keys()
        return {key: value for key, value in full.items() if key[len(prefix) :] in keep}

    def load_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True, assign: bool = False):
        expected = set(self.state_dict())
        missing = sorted(expected - set(state_dict))
        unexpected = sorted(set(state_dict) - expected)
        if strict and (missing or unexpected):
            raise UserInputError(
                f"checkpoint does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_finite_state(checkpoint["state_dict"], "the checkpoint")

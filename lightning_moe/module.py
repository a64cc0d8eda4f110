"""`AdapterModule`: the LightningModule every domain task builds on.

`configure_model` builds the frozen base, injects adapters (or loads a saved adapter folder),
shards it under FSDP2 and optionally compiles; it is idempotent. Checkpoints hold
adapter/router/trainable weights only, plus a fingerprint of the base so a checkpoint is never
silently applied to another base. Router auxiliary losses are added to the task loss, and routing statistics are logged.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_moe.adapters import (
    AdapterRule,
    InjectionReport,
    adapted_layers,
    gate_label_loss,
    inject,
    load_adapter,
    load_balance_loss,
    router_z_loss,
    routing_statistics,
)
from lightning_moe.adapters.aux_losses import BalanceScope
from lightning_moe.adapters.checkpoint import adapter_state_dict, base_fingerprint, write_adapter
from lightning_moe.adapters.errors import AdapterCheckpointError, UserInputError
from lightning_moe.adapters.files import compare_fingerprints, read_adapter_config
from lightning_moe.adapters.mixture import check_expert_references, expert_references
from lightning_moe.non_finite import (
    check_finite_state,
    stop_on_non_finite_gradients,
    stop_on_non_finite_terms,
)
from lightning_moe.parallel import (
    data_parallel_mesh,
    full_tensor,
    mixed_precision_policy,
    shard_adapted_model,
)
from lightning_moe.routing_logging import log_routing_statistics


@dataclass
class RouterLoss:
    """Auxiliary router losses added to the task loss.

    Args:
        balance_coef: Weight of the Switch/Mixtral load-balancing loss (1.0 when balanced).
        z_coef: Weight of the router z-loss.
        balance_scope: "batch" balances over all tokens of the batch, "sample" per sequence.
        label_coef: Weight of the supervised gate loss of LoRA mixtures (MeteoRA): every token's
            gate is trained towards the expert whose `expert_tasks` entry is its sample's
            `domain`. Needs a mixture with `expert_tasks` and batches with a "domain" list.
    """

    balance_coef: float = 0.01
    z_coef: float = 0.0
    balance_scope: BalanceScope = "batch"
    label_coef: float = 0.0


def _adamw(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)


class AdapterModule(L.LightningModule):
    """Base task: subclasses implement `build_model()` and `task_loss(batch)`.

    Args:
        adapters: Injection rules: which modules get which adapter (LoRA, MoE, ...); [] for none.
        adapter_path: A saved adapter folder to start from instead of fresh adapters from `adapters`.
        router_loss: Auxiliary router losses.
        optimizer: Optimizer factory, called with parameter groups ("adapters", "routers", "extra").
        scheduler: Optional learning-rate scheduler factory (stepped every optimizer step).
        router_lr: Learning rate of the routers and LoRA-mixture gates (None: the optimizer's).
        extra_lr: Learning rate of other trainable modules such as projectors (None: the optimizer's).
        compile: Compile the adapted model in `configure_model`, after sharding (nn.Module.compile:
            parameter names and checkpoints are unchanged).
        routing_log_every_n_steps: How often routing statistics go to the logger.
    """

    def __init__(
        self,
        adapters: list[AdapterRule] | None = None,
        adapter_path: str | None = None,
        router_loss: RouterLoss | None = None,
        optimizer: OptimizerCallable = _adamw,
        scheduler: LRSchedulerCallable | None = None,
        router_lr: float | None = None,
        extra_lr: float | None = None,
        compile: bool = False,
        routing_log_every_n_steps: int = 25,
    ) -> None:
        super().__init__()
        if adapters is None and not adapter_path:
            raise UserInputError(
                "give `adapters` (injection rules; [] for none, e.g. to train only a projector) "
                "or `adapter_path` (a saved adapter folder)"
            )
        self.adapter_rules = list(adapters or [])
        self.adapter_path = adapter_path
        self.router_loss = router_loss or RouterLoss()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.router_lr = router_lr
        self.extra_lr = extra_lr
        self.compile_model = compile
        self.routing_log_every_n_steps = routing_log_every_n_steps
        self.model: nn.Module | None = None
        self.injection: InjectionReport | None = None
        self.expert_of_task: dict[str, int] = {}  # for the supervised gate loss
        self.base_prints: dict[str, dict] = {}  # taken before sharding, when every weight is whole
        self.labelled_gates: set[str] = set()

    # --- what a task provides -------------------------------------------------------------
    def build_model(self) -> nn.Module:
        """Build (or load) the frozen base model."""
        raise NotImplementedError

    def task_loss(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        """Return the task loss and the token mask that routing losses should use (or None)."""
        raise NotImplementedError

    def extra_trainable_modules(self) -> dict[str, nn.Module]:
        """Modules outside the adapters that train and are checkpointed (e.g. a projector)."""
        return {}

    # --- model life cycle -----------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        model = self.build_model()
        if self.adapter_path:
            self.injection = load_adapter(model, self.adapter_path)
        else:
            self.injection = inject(model, self.adapter_rules)
        self.model = model.train()  # from_pretrained returns eval mode; adapter dropout needs train
        for module in self.extra_trainable_modules().values():
            module.requires_grad_(True)
        if self.router_loss.label_coef > 0:
            self._find_labelled_gates()
        self.base_prints = base_fingerprint(self.model)
        if self.device_mesh is not None:  # ModelParallelStrategy / FSDP2Strategy
            mesh = data_parallel_mesh(self.device_mesh)
            shard_adapted_model(self.model, mesh, mixed_precision_policy(self.trainer.strategy))
        if self.compile_model:
            self.model.compile()
        rank_zero_info(self.injection.summary())
        extra = {
            name: sum(p.numel() for p in m.parameters()) for name, m in self.extra_trainable_modules().items()
        }
        if extra:
            rank_zero_info(
                "also training "
                + ", ".join(f"{name} ({count:,} parameters)" for name, count in extra.items())
            )

    def _find_labelled_gates(self) -> None:
        expert_tasks = None
        for name, layer in adapted_layers(self.model):
            tasks = getattr(layer.config, "expert_tasks", None)
            if not tasks:
                continue
            if expert_tasks is not None and tasks != expert_tasks:
                raise UserInputError(
                    f"the supervised gate loss needs one task per expert shared by all mixtures; got "
                    f"expert_tasks {expert_tasks} and {tasks}"
                )
            expert_tasks = tasks
            self.labelled_gates.add(name)
        self.expert_of_task = {task: index for index, task in enumerate(expert_tasks or [])}
        if not self.labelled_gates:
            raise UserInputError(
                f"router_loss.label_coef={self.router_loss.label_coef} trains gates towards each sample's task, "
                "but no adapter names its experts' tasks; set `expert_tasks` on an xlora/meteora adapter"
            )

    def gate_labels(self, batch: Any) -> Tensor:
        """The expert index of each sample's task (`batch["domain"]`), -100 for unknown tasks."""
        if not isinstance(batch, dict) or "domain" not in batch:
            raise UserInputError(
                "the supervised gate loss needs batches with a 'domain' list (the task of each sample)"
            )
        return torch.tensor(
            [self.expert_of_task.get(domain, -100) for domain in batch["domain"]], device=self.device
        )

    def export_adapter(self, folder: str, base_model: str = "", overwrite: bool = False) -> None:
        """Write the adapters in the stand-alone format (adapter_config.json + safetensors).

        Every process calls it: a sharded model gathers whole tensors, and rank 0 writes them,
        so the folder is the same as from a single process.
        """
        rules = self.adapter_rules or self._rules_from_adapter_path()
        state = {key: full_tensor(value) for key, value in adapter_state_dict(self.model).items()}
        if self.global_rank == 0:
            write_adapter(state, self.model, rules, self.base_prints, folder, base_model, overwrite)

    def _rules_from_adapter_path(self) -> list[AdapterRule]:
        return [AdapterRule.from_dict(rule) for rule in read_adapter_config(self.adapter_path)["rules"]]

    # --- checkpoints: trainable state only ------------------------------------------------
    def _checkpoint_key(self, key: str, trainable: set[str]) -> bool:
        extra = tuple(f"{name}." for name in self.extra_trainable_modules())
        return ".adapter." in key or key in trainable or key.startswith(extra)

    def state_dict(self, *args, **kwargs) -> dict[str, Tensor]:
        full = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        trainable = {prefix + name for name, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in full.items() if self._checkpoint_key(k[len(prefix) :], trainable)}

    def load_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True, assign: bool = False):
        expected = set(self.state_dict())
        missing = sorted(expected - set(state_dict))
        unexpected = sorted(set(state_dict) - expected)
        if strict and (missing or unexpected):
            raise AdapterCheckpointError(
                f"checkpoint does not fit this model's adapters: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_finite_state(checkpoint["state_dict"], "the checkpoint")
        checkpoint["base_fingerprint"] = self.base_prints
        checkpoint["expert_sha256"] = expert_references(dict(adapted_layers(self.model)))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        for name, expected in checkpoint.get("base_fingerprint", {}).items():
            if name not in self.base_prints:
                raise AdapterCheckpointError(
                    f"checkpoint adapts layer {name!r}, which this model does not adapt"
                )
            compare_fingerprints(name, self.base_prints[name], expected, "checkpoint")
        check_expert_references(
            dict(adapted_layers(self.model)), checkpoint.get("expert_sha256", {}), "checkpoint"
        )

    # --- steps ----------------------------------------------------------------------------
    def _loss_with_router_terms(self, batch: Any, stage: str) -> Tensor:
        # the collector the injection wired up; no per-step search through the model's modules
        with self.injection.collector.capture() as records:
            task_loss, token_mask = self.task_loss(batch)
        terms = {"task loss": task_loss}
        log = partial(
            self.log,
            sync_dist=stage != "train",
            batch_size=token_mask.shape[0] if token_mask is not None else None,
        )
        log(f"{stage}/task_loss", task_loss, prog_bar=stage == "train")
        loss = task_loss
        if records:
            balance = load_balance_loss(records, token_mask, self.router_loss.balance_scope)
            z_loss = router_z_loss(records, token_mask)
            terms |= {"balance loss": balance, "router z-loss": z_loss}
            loss = loss + self.router_loss.balance_coef * balance + self.router_loss.z_coef * z_loss
            log(f"{stage}/balance_loss", balance)
            log(f"{stage}/z_loss", z_loss)
            if self.router_loss.label_coef > 0:
                gates = {name: record for name, record in records.items() if name in self.labelled_gates}
                label_loss = gate_label_loss(gates, self.gate_labels(batch), token_mask)
                terms["gate label loss"] = label_loss
                loss = loss + self.router_loss.label_coef * label_loss
                log(f"{stage}/gate_label_loss", label_loss)
            if stage == "train" and self.global_step % self.routing_log_every_n_steps == 0:
                log_routing_statistics(self, routing_statistics(records, token_mask), records, stage)
        if stage == "train":
            stop_on_non_finite_terms(self, terms)
        log(f"{stage}/loss", loss, prog_bar=True)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # with a loss scaler (fp16) an infinite gradient is expected now and then: the scaler skips that step
        if getattr(self.trainer.precision_plugin, "scaler", None) is None:
            stop_on_non_finite_gradients(
                self, (p for group in optimizer.param_groups for p in group["params"])
            )

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._loss_with_router_terms(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._loss_with_router_terms(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._loss_with_router_terms(batch, "test")

    # --- optimisation ---------------------------------------------------------------------
    def parameter_groups(self) -> list[dict]:
        groups: dict[str, list[nn.Parameter]] = {"adapters": [], "routers": [], "extra": []}
        for name, parameter in self.named_parameters():
            if not parameter.requires_grad:
                continue
            if ".router." in name or ".adapter.gate." in name:  # MoE routers and LoRA-mixture gates
                groups["routers"].append(parameter)
            elif ".adapter." in name:
                groups["adapters"].append(parameter)
            else:
                groups["extra"].append(parameter)
        lrs = {"routers": self.router_lr, "extra": self.extra_lr}
        return [
            {"params": params, "name": name} | ({"lr": lrs[name]} if lrs.get(name) is not None else {})
            for name, params in groups.items()
            if params
        ]

    def configure_optimizers(self):
        try:
            optimizer = self.optimizer_factory(self.parameter_groups())
        except (ValueError, TypeError) as error:  # e.g. torch's "Invalid learning rate: nan"
            raise UserInputError(f"the optimizer refuses its settings: {error}") from None
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

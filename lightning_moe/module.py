"""`AdapterModule`: a `TaskModule` whose frozen model gets adapters.

`prepare_model` injects the configured adapters (or loads a saved adapter folder). Each step
adds the router and gate losses (`RouterLosses`) to the task loss and logs routing statistics.
Adapters, routers and the task's other trainable modules get their own parameter groups, from
what each adapter declares (`Adapter.router_parameters`), never from parameter names. Checkpoints
hold the adapter state plus a fingerprint of the base, so a checkpoint is never silently applied
to another base; `export` writes the adapter folder.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, distributed, nn
from torch.utils.data import DataLoader, DistributedSampler

from lightning_moe.adapters import (
    AdapterConfigError,
    AdapterRule,
    InjectionReport,
    adapted_layers,
    describe_injection,
    expert_references,
    inject,
    load_adapter,
    routing_statistics,
)
from lightning_moe.adapters.adapter_folder import (
    adapter_state_dict,
    base_fingerprint,
    check_fingerprints,
    read_rules,
    write_adapter,
)
from lightning_moe.adapters.data_init import initialise_from_data, needs_data, resolved_rules
from lightning_moe.adapters.dylora import sample_active_ranks
from lightning_moe.adapters.files import write_folder_files
from lightning_moe.adapters.lora_mixture import check_expert_references
from lightning_moe.adapters.pruning import PruneConfig
from lightning_moe.adapters.quantized import QuantizeConfig
from lightning_moe.errors import UserInputError
from lightning_moe.parallel import full_tensor
from lightning_moe.pruned_base import PrunedBase, prune_model, recovered_adapter_state
from lightning_moe.quantized_base import quantize_model
from lightning_moe.router_losses import RouterLoss, RouterLosses
from lightning_moe.routing_logging import log_routing_statistics
from lightning_moe.task import TaskModule


def first_process_batches(loader: DataLoader) -> DataLoader:
    """The loader as process 0 reads it. A data module's own loader gives each process its
    share; a data-driven init must see the same batches everywhere."""
    sampler = loader.sampler
    if not isinstance(sampler, DistributedSampler) or sampler.rank == 0:
        return loader
    shared = copy.copy(sampler)
    shared.rank = 0
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=shared,
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
    )


class AdapterModule(TaskModule):
    """Base of the tasks that adapt a frozen model: subclasses implement `build_model()` and
    `task_loss(batch)`.

    Args:
        adapters: Injection rules: which modules get which adapter (LoRA, MoE, ...); none by
            default (e.g. to train only a projector).
        adapter_path: A saved adapter folder to start from instead of fresh adapters from `adapters`.
        router_loss: Auxiliary router losses.
        router_lr: Learning rate of the routers and LoRA-mixture gates (None: the optimizer's).
        extra_lr: Learning rate of the task's other trainable modules, such as a projector
            (None: the optimizer's).
        routing_log_every_n_steps: How often routing statistics go to the logger.
        quantize: Store the frozen base's linear layers in 4 bits (e.g. {scheme: nf4}); the
            adapters keep the model's dtype (see `lightning_moe.adapters.quantized`).
        prune: LoRAM: remove MLP channels of the base before training (e.g. {ratio: 0.5}); the
            exported adapter is recovered to the full model (see `lightning_moe.adapters.pruning`).
        **kwargs: Optimizer, scheduler and compile settings of `TaskModule`.
    """

    def __init__(
        self,
        adapters: list[AdapterRule] | None = None,
        adapter_path: str | None = None,
        router_loss: RouterLoss | None = None,
        router_lr: float | None = None,
        extra_lr: float | None = None,
        routing_log_every_n_steps: int = 25,
        quantize: QuantizeConfig | None = None,
        prune: PruneConfig | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.adapter_rules = list(adapters or [])
        self.adapter_path = adapter_path
        self.router_loss = router_loss or RouterLoss()
        self.router_lr = router_lr
        self.extra_lr = extra_lr
        self.routing_log_every_n_steps = routing_log_every_n_steps
        self.quantize = quantize
        self.prune = prune
        self.pruned_base: PrunedBase | None = None
        self.injection: InjectionReport | None = None
        self.router_losses: RouterLosses | None = None
        self.base_prints: dict[str, dict] = {}  # taken before sharding, when every weight is whole
        self.routing_summary: tuple[int, dict[str, float] | None] | None = None  # (step, summary) last logged

    # --- model life cycle -----------------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> None:
        self.shrink_base(model)
        if self.adapter_path:
            self.injection = load_adapter(model, self.adapter_path)
            self.adapter_rules = read_rules(self.adapter_path)
        else:
            self.injection = inject(model, self.adapter_rules)
            if needs_data(model) and self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
                self.initialise_from_data(model)
        self.router_losses = RouterLosses(self.router_loss, model)
        self.base_prints = base_fingerprint(model)
        if self.injection.adapted:
            rank_zero_info(self.injection.summary())

    def shrink_base(self, model: nn.Module) -> None:
        """LoRAM's pruning, then the 4-bit storage: both before any adapter attaches, so the
        adapters are built for (and trained on) the smaller base."""
        if self.quantize is not None and self.device_mesh is not None:
            raise UserInputError(
                "quantize does not shard under FSDP2 yet: torchao's NF4 tensor splits only when every "
                "layer's count of scales divides the number of processes; use the DDP strategy"
            )
        if self.prune is not None:  # before anything attaches: the adapters train on the small model
            if self.adapter_path or self.quantize:
                raise UserInputError(
                    "prune trains fresh adapters on a full-precision pruned base; it takes neither "
                    "adapter_path (load the recovered adapter on the unpruned model) nor quantize"
                )
            try:
                self.pruned_base = prune_model(model, self.prune, self.adapter_rules, self.init_batches)
            except AdapterConfigError as error:
                raise UserInputError(str(error)) from None
        if self.quantize is not None:  # before the adapters attach: they see 4-bit linears
            try:
                quantize_model(model, self.quantize, self.adapter_rules, self.adapter_path, self.init_batches)
            except AdapterConfigError as error:
                raise UserInputError(str(error)) from None

    def initialise_from_data(self, model: nn.Module) -> None:
        """EVA / LoRA-GA from the first training batches, before sharding and before step 0.

        Every process reads the same batches (the data module's own loader, not the trainer's
        distributed one) and computes the same ranks; rank 0's tensors are then broadcast so the
        processes hold identical adapters. A resumed run computes the same again, and the
        checkpoint's recorded rules confirm it (`on_load_checkpoint`) before its state loads.
        """
        try:
            report = initialise_from_data(model, *self.init_batches())
        except AdapterConfigError as error:
            raise UserInputError(str(error)) from None
        self.adapter_rules = resolved_rules(self.adapter_rules, model, report)
        self.injection = describe_injection(model, self.injection.collector)
        if distributed.is_available() and distributed.is_initialized():
            ranks = self.trainer.strategy.broadcast(report.eva_ranks)
            if ranks != report.eva_ranks:
                raise UserInputError(
                    f"EVA gave process {self.global_rank} other ranks than process 0; the data differ"
                )
            with torch.no_grad():
                for value in adapter_state_dict(model).values():
                    distributed.broadcast(value, src=0)
        rank_zero_info(f"data-driven init: {report.summary()}")

    def init_batches(self) -> tuple[DataLoader, Any]:
        """The batches a data-driven init reads (process 0's share of the training data, on
        every process) and the forward it calls: batch -> (task loss, token mask)."""
        if self._trainer is None or self.trainer.state.fn != TrainerFn.FITTING:
            raise UserInputError(
                "a data-driven init (eva, lora_ga, lq_weighting: activations) runs only in `fit`"
            )
        loader = first_process_batches(
            self.trainer.datamodule.train_dataloader() if self.trainer.datamodule else self.train_dataloader()
        )
        device = next(self.model.parameters()).device

        def forward(batch):
            return self.task_loss(move_data_to_device(batch, device))

        return loader, forward

    def sharded_units(self) -> list[nn.Module]:
        # each adapter on its own, so its small parameters are gathered apart from its block's;
        # fixed-weight mixtures hold only buffers and are not units
        return [
            layer.adapter
            for _, layer in adapted_layers(self.model)
            if next(layer.adapter.parameters(), None) is not None
        ]

    def export(self, folder: str, base_model: str = "", overwrite: bool = False) -> None:
        """Write the adapters in the stand-alone format (adapter_config.json + safetensors).

        Every process calls it: a sharded model gathers whole tensors, and rank 0 writes them,
        so the folder is the same as from a single process.
        """
        state = {key: full_tensor(value) for key, value in adapter_state_dict(self.model).items()}
        extra = self.exported_modules()
        if not state and not extra:
            raise UserInputError(f"{type(self).__name__} has no adapters or modules to export")
        if self.global_rank != 0:
            return
        if state:
            rules, prints = self.adapter_rules, self.base_prints
            if self.pruned_base is not None:  # LoRAM: the folder is for the full model
                state = recovered_adapter_state(self.model, self.pruned_base, state)
                prints = {name: self.pruned_base.full_prints[name] for name in prints}
            write_adapter(state, self.model, rules, prints, folder, base_model, overwrite, extra)
        else:  # e.g. a projector trained alone
            write_folder_files(folder, extra, {}, overwrite)

    def exported_modules(self) -> dict[str, dict[str, Tensor]]:
        """More safetensors files for the adapter folder ({file name: tensors}), e.g. a projector;
        every process calls it (gathering shards)."""
        return {}

    # --- steps ----------------------------------------------------------------------------
    def loss_terms(self, batch: Any) -> tuple[dict[str, tuple[float, Tensor]], Tensor | None]:
        # the collector the injection wired up; no per-step search through the model's modules
        with self.injection.collector.capture() as records:
            terms, token_mask = super().loss_terms(batch)
        terms |= self.router_losses.terms(records, token_mask, batch)
        if records and self.training and self.global_step % self.routing_log_every_n_steps == 0:
            summary = log_routing_statistics(self, routing_statistics(records, token_mask), "train")
            self.routing_summary = (self.global_step, summary)
        return terms, token_mask

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # DyLoRA: this step's rank, a function of the seed and the step (so resumes draw the same)
        rank = sample_active_ranks(self.model, int(os.environ.get("PL_GLOBAL_SEED", 0)), self.global_step)
        if rank is not None:
            self.log("train/dylora_rank", float(rank))

    # --- optimisation ---------------------------------------------------------------------
    def parameter_groups(self) -> list[dict]:
        """Adapters, routers (and gates) and the task's other trainable modules, each its own
        group, named so schedulers and callbacks can tell them apart."""
        layers = [layer for _, layer in adapted_layers(self.model)]
        routers = {id(p) for layer in layers for p in layer.adapter.router_parameters()}
        adapters = {id(p) for layer in layers for p in layer.adapter.parameters()}
        groups: dict[str, list[nn.Parameter]] = {"adapters": [], "routers": [], "extra": []}
        for parameter in self.parameters():
            if parameter.requires_grad:
                group = (
                    "routers"
                    if id(parameter) in routers
                    else "adapters"
                    if id(parameter) in adapters
                    else "extra"
                )
                groups[group].append(parameter)
        lrs = {"routers": self.router_lr, "extra": self.extra_lr}
        return [
            {"params": params, "name": name} | ({"lr": lrs[name]} if lrs.get(name) is not None else {})
            for name, params in groups.items()
            if params
        ]

    # --- checkpoints: adapter state, trainable modules, and the base they belong to ----------
    def checkpoint_keys(self) -> set[str]:
        keys = super().checkpoint_keys()
        for name, layer in adapted_layers(self.model):
            keys |= {f"model.{name}.adapter.{key}" for key in layer.adapter.state_dict()}
        return keys

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["base_fingerprint"] = self.base_prints
        checkpoint["adapter_rules"] = [rule.to_dict() for rule in self.adapter_rules]
        checkpoint["expert_sha256"] = expert_references(dict(adapted_layers(self.model)))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_fingerprints(self.base_prints, checkpoint.get("base_fingerprint", {}), "checkpoint")
        check_expert_references(
            dict(adapted_layers(self.model)), checkpoint.get("expert_sha256", {}), "checkpoint"
        )
        # after the base and expert checks, whose errors name the cause more precisely
        recorded = checkpoint.get("adapter_rules")
        if recorded is not None and recorded != [rule.to_dict() for rule in self.adapter_rules]:
            raise UserInputError(
                "the checkpoint's adapters were built from other rules (or another data-driven init "
                f"result) than this run's: checkpoint {recorded[:2]}, this run "
                f"{[rule.to_dict() for rule in self.adapter_rules][:2]}"
            )

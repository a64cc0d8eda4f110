"""The auxiliary losses of a model's routers and gates: their settings (`RouterLoss`, part of a
task's config) and the one object that computes them from a forward pass's routing records
(`RouterLosses`), MeteoRA's supervised gate loss included."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_moe.adapters import (
    LoraMixtureAdapter,
    RoutingRecord,
    adapted_layers,
    gate_label_loss,
    load_balance_loss,
    router_z_loss,
)
from lightning_moe.adapters.aux_losses import BalanceScope
from lightning_moe.errors import UserInputError


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


class RouterLosses:
    """The router and gate losses of one adapted model, by name: (coefficient, value) per batch.

    With `label_coef` set, the gates to supervise are the LoRA mixtures whose experts name their
    tasks (`expert_tasks`), which must be the same list for all of them.
    """

    def __init__(self, settings: RouterLoss, model: nn.Module) -> None:
        self.settings = settings
        self.labelled_gates: set[str] = set()
        self.expert_of_task: dict[str, int] = {}
        if settings.label_coef > 0:
            self._find_labelled_gates(model)

    def _find_labelled_gates(self, model: nn.Module) -> None:
        expert_tasks = None
        for name, layer in adapted_layers(model):
            tasks = layer.config.expert_tasks if isinstance(layer.adapter, LoraMixtureAdapter) else None
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
                f"router_loss.label_coef={self.settings.label_coef} trains gates towards each sample's task, "
                "but no adapter names its experts' tasks; set `expert_tasks` on an xlora/meteora adapter"
            )

    def gate_labels(self, batch: Any, device: torch.device) -> Tensor:
        """The expert index of each sample's task (`batch["domain"]`), -100 for unknown tasks."""
        if not isinstance(batch, dict) or "domain" not in batch:
            raise UserInputError(
                "the supervised gate loss needs batches with a 'domain' list (the task of each sample)"
            )
        return torch.tensor(
            [self.expert_of_task.get(domain, -100) for domain in batch["domain"]], device=device
        )

    def terms(
        self, records: Mapping[str, RoutingRecord], token_mask: Tensor | None, batch: Any
    ) -> dict[str, tuple[float, Tensor]]:
        """{loss name: (coefficient, value)} for this batch's routing records (none without routers)."""
        if not records:
            return {}
        settings = self.settings
        terms = {
            "balance_loss": (
                settings.balance_coef,
                load_balance_loss(records, token_mask, settings.balance_scope),
            ),
            "z_loss": (settings.z_coef, router_z_loss(records, token_mask)),
        }
        if settings.label_coef > 0:
            gates = {name: record for name, record in records.items() if name in self.labelled_gates}
            labels = self.gate_labels(batch, next(iter(records.values())).logits.device)
            terms["gate_label_loss"] = (settings.label_coef, gate_label_loss(gates, labels, token_mask))
        return terms

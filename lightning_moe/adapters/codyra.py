"""kind `codyra`: rank-gated LoRA (CoDyRA / Dynamic Rank-Selective LoRA): scaling * B @ diag(g) @ A.

Each of the r ranks has a gate g_i. After every optimizer step the gates take a proximal step
of an L1 penalty, soft-thresholding: g <- sign(g) * max(|g| - amount, 0), where amount is the
learning rate times the current penalty (which rises over training, see
`RankGateShrinkage` in the continual domain). Ranks whose gate reaches 0 contribute nothing. At the end of a
task the surviving ranks are merged into the frozen part of the layer and the ranks start afresh
for the next task.

Where merged updates live: not in the pretrained weight itself but in a frozen low-rank store
beside it (`merged_A`, `merged_B`, the first `merged_count` ranks used, gates folded into B).
W x + merged_B merged_A x equals (W + merged_B merged_A) x, so this is the paper's merge, while
the pretrained weight stays what checkpoints fingerprint and the merged knowledge travels with
the adapter checkpoint (a task's checkpoint restores it). `delta_weight` includes the store, so
exporting merges everything into W.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import Adapter, register_adapter
from .errors import AdapterConfigError
from .lora import LowRankConfig, zero_update_init_
from .rank_store import append_ranks, layers_with_adapter


@dataclass
class CodyraConfig(LowRankConfig):
    """CoDyRA / Dynamic Rank-Selective LoRA (Lu et al., 2025): LoRA whose r ranks each carry a
    learnable gate, scaling * B @ diag(g) @ A. Training shrinks the gates with a proximal
    soft-threshold after every optimizer step (`soft_threshold_rank_gates`), so unneeded ranks
    reach exactly zero; at a task end the surviving ranks are merged into the layer's frozen part
    and fresh ranks start for the next task.

    Args:
        rank, alpha, dropout, use_rslora, init: As in LoraConfig ("kaiming" or "gaussian").
        gate_init: Starting value of every rank's gate.
        num_tasks: Capacity: tasks whose merged ranks the layer can hold.
    """

    kind: ClassVar[str] = "codyra"
    gate_init: float = 1.0
    num_tasks: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_tasks < 1:
            raise AdapterConfigError(f"num_tasks must be >= 1, got num_tasks={self.num_tasks}")
        self.allow_inits("rank-gated LoRA adapters", "kaiming", "gaussian")


@register_adapter
class CodyraAdapter(Adapter):
    """A: [r, in], B: [out, r], gates: [r]; merged ranks of earlier tasks in fixed-capacity buffers."""

    config_class = CodyraConfig
    task_record = "codyra_ranks_kept"

    def __init__(self, base_layer: nn.Linear, config: CodyraConfig) -> None:
        super().__init__(base_layer, config)
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.scaling = config.scaling
        self.lora_A = nn.Parameter(torch.empty(config.rank, base_layer.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(base_layer.out_features, config.rank, **factory))
        self.rank_gates = nn.Parameter(torch.empty(config.rank, **factory))
        capacity = config.rank * config.num_tasks
        self.register_buffer("merged_A", torch.zeros(capacity, base_layer.in_features, **factory))
        self.register_buffer("merged_B", torch.zeros(base_layer.out_features, capacity, **factory))
        self.register_buffer("merged_count", torch.zeros((), dtype=torch.long))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.reset()

    @property
    def mergeable(self) -> bool:
        return True  # the update does not depend on the input

    @torch.no_grad()
    def reset(self) -> None:
        """Fresh ranks: A random, B = 0 (a zero update), every gate at `gate_init`."""
        zero_update_init_(self.lora_A, self.lora_B, self.config.init)
        self.rank_gates.fill_(self.config.gate_init)

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.lora_A.dtype)
        current = (
            F.linear(F.linear(self.dropout(x), self.lora_A) * self.rank_gates, self.lora_B) * self.scaling
        )
        count = int(self.merged_count)
        if count == 0:
            return current
        return current + F.linear(F.linear(x, self.merged_A[:count]), self.merged_B[:, :count])

    def delta_weight(self) -> Tensor:
        count = int(self.merged_count)
        current = (self.lora_B * self.rank_gates) @ self.lora_A * self.scaling
        return current + self.merged_B[:, :count] @ self.merged_A[:count]

    @torch.no_grad()
    def merge_current(self) -> int:
        """Append the ranks whose gate is not 0 (gate and scaling folded into B) to the merged
        store, then start fresh ranks; returns how many ranks were kept."""
        keep = self.rank_gates.nonzero().flatten()
        append_ranks(
            self.merged_A,
            self.merged_B,
            self.merged_count,
            self.lora_A[keep],
            self.lora_B[:, keep] * self.rank_gates[keep] * self.scaling,
            f"the rank-gated layer holds merged ranks of num_tasks={self.config.num_tasks} tasks and is full; "
            "raise num_tasks",
        )
        self.reset()
        return len(keep)

    def end_task(self) -> int:
        return self.merge_current()

    @property
    def active_ranks(self) -> int:
        return int((self.rank_gates != 0).sum())


def rank_gated_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, AdaptedLinear) of every layer with a rank-gated adapter."""
    return layers_with_adapter(model, CodyraAdapter)


@torch.no_grad()
def soft_threshold_rank_gates(model: nn.Module, amount: float) -> None:
    """The proximal step of amount * |g|_1 on every rank gate: shrink towards 0, stop at 0."""
    for _, layer in rank_gated_layers(model):
        gates = layer.adapter.rank_gates
        gates.copy_(gates.sign() * (gates.abs() - amount).clamp(min=0))

"""Rank-gated LoRA (CoDyRA / Dynamic Rank-Selective LoRA): scaling * B @ diag(g) @ A.

Each of the r ranks has a gate g_i. After every optimizer step the gates take a proximal step
of an L1 penalty, soft-thresholding: g <- sign(g) * max(|g| - amount, 0), where amount is the
learning rate times the current penalty (which rises over training, see
`callbacks.RankGateShrinkage`). Ranks whose gate reaches 0 contribute nothing. At the end of a
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

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .config import RankGatedLoraConfig
from .lora import zero_update_init_
from .rank_store import append_ranks, layers_with_adapter


class RankGatedLoraAdapter(nn.Module):
    """A: [r, in], B: [out, r], gates: [r]; merged ranks of earlier tasks in fixed-capacity buffers."""

    mergeable = True  # the update does not depend on the input

    def __init__(self, base_layer: nn.Linear, config: RankGatedLoraConfig) -> None:
        super().__init__()
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.config = config
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

    @property
    def active_ranks(self) -> int:
        return int((self.rank_gates != 0).sum())


def rank_gated_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, AdaptedLinear) of every layer with a rank-gated adapter."""
    return layers_with_adapter(model, RankGatedLoraAdapter)


@torch.no_grad()
def soft_threshold_rank_gates(model: nn.Module, amount: float) -> None:
    """The proximal step of amount * |g|_1 on every rank gate: shrink towards 0, stop at 0."""
    for _, layer in rank_gated_layers(model):
        gates = layer.adapter.rank_gates
        gates.copy_(gates.sign() * (gates.abs() - amount).clamp(min=0))


def merge_rank_gated_updates(model: nn.Module) -> dict[str, int]:
    """At a task end: merge each layer's surviving ranks and start fresh ones (`merge_current`).
    Returns how many ranks each layer kept (pruned ranks had gate 0 and add nothing)."""
    return {name: layer.adapter.merge_current() for name, layer in rank_gated_layers(model)}

"""Rank-gated LoRA (CoDyRA / Dynamic Rank-Selective LoRA): scaling * B @ diag(g) @ A.

Each of the r ranks has a gate g_i. After every optimizer step the gates take a proximal step
of an L1 penalty, soft-thresholding: g <- sign(g) * max(|g| - amount, 0), where amount is the
learning rate times the current penalty (which rises over training, see the callback). Ranks
whose gate reaches 0 contribute nothing; at the end of a task the surviving update is merged
into the base weight (the knowledge stays, the adapter's parameters are free again) and the
ranks start afresh for the next task.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .config import RankGatedLoraConfig
from .lora import zero_update_init_


class RankGatedLoraAdapter(nn.Module):
    """A: [r, in], B: [out, r], gates: [r]."""

    mergeable = True  # the update does not depend on the input

    def __init__(self, base_layer: nn.Linear, config: RankGatedLoraConfig) -> None:
        super().__init__()
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.config = config
        self.scaling = config.scaling
        self.lora_A = nn.Parameter(torch.empty(config.rank, base_layer.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(base_layer.out_features, config.rank, **factory))
        self.rank_gates = nn.Parameter(torch.empty(config.rank, **factory))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """Fresh ranks: A random, B = 0 (a zero update), every gate at `gate_init`."""
        zero_update_init_(self.lora_A, self.lora_B, self.config.init)
        self.rank_gates.fill_(self.config.gate_init)

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.lora_A.dtype)
        return F.linear(F.linear(self.dropout(x), self.lora_A) * self.rank_gates, self.lora_B) * self.scaling

    def delta_weight(self) -> Tensor:
        return (self.lora_B * self.rank_gates) @ self.lora_A * self.scaling

    @property
    def active_ranks(self) -> int:
        return int((self.rank_gates != 0).sum())


def rank_gated_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, AdaptedLinear) of every layer with a rank-gated adapter."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(getattr(module, "adapter", None), RankGatedLoraAdapter)
    ]


@torch.no_grad()
def soft_threshold_rank_gates(model: nn.Module, amount: float) -> None:
    """The proximal step of amount * |g|_1 on every rank gate: shrink towards 0, stop at 0."""
    for _, layer in rank_gated_layers(model):
        gates = layer.adapter.rank_gates
        gates.copy_(gates.sign() * (gates.abs() - amount).clamp(min=0))


@torch.no_grad()
def merge_rank_gated_updates(model: nn.Module) -> dict[str, int]:
    """At a task end: add each layer's surviving update to its base weight, then reset the ranks.
    Returns how many ranks each layer kept (pruned ranks had gate 0 and add nothing)."""
    kept = {}
    for name, layer in rank_gated_layers(model):
        kept[name] = layer.adapter.active_ranks
        layer.base_layer.weight += layer.adapter.delta_weight().to(layer.base_layer.weight.dtype)
        layer.adapter.reset()
    return kept

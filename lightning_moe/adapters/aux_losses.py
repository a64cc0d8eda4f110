"""Model-level router losses and routing statistics, computed once from the captured records.

Definitions (per routed layer, averaged over layers; only tokens with mask == 1 count):

- load balance (Switch / Mixtral form): E * sum_e f_e * P_e, where f_e is the fraction of the
  N*k routing assignments that went to expert e and P_e the mean router probability of e.
  It is 1.0 for perfectly uniform routing, whatever k. With scope "sample" it is computed per
  sequence and averaged over sequences (LLaVA-MoLE balances each sample).
- router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2.
- gate label loss (MeteoRA's supervised gate loss): cross-entropy of the gate logits of every
  token against the expert of its sequence's task; sequences without a label (-100) do not count.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

from .routing import RoutingRecord

BalanceScope = Literal["batch", "sample"]


def _token_mask(record: RoutingRecord, mask: Tensor | None) -> Tensor:
    lead_shape = record.logits.shape[:-1]
    if mask is None:
        return torch.ones(lead_shape, device=record.logits.device)
    if tuple(mask.shape) != tuple(lead_shape):
        raise ValueError(
            f"token mask of shape {tuple(mask.shape)} does not fit layer {record.layer!r}, "
            f"whose tokens have shape {tuple(lead_shape)}"
        )
    return mask.to(device=record.logits.device, dtype=torch.float32)


def _assignment_counts(record: RoutingRecord) -> Tensor:
    """[..., E]: how many of a token's k slots chose each expert."""
    return F.one_hot(record.indices, record.num_experts).sum(dim=-2).float()


def load_balance_loss(
    records: Mapping[str, RoutingRecord], mask: Tensor | None = None, scope: BalanceScope = "batch"
) -> Tensor:
    """Switch/Mixtral load-balancing loss; 1.0 at uniform routing (see module docstring)."""
    losses = []
    for record in records.values():
        token_mask = _token_mask(record, mask)[..., None]
        probs = record.logits.float().softmax(dim=-1) * token_mask
        assigned = _assignment_counts(record) * token_mask
        if scope == "sample":
            if probs.dim() < 3:
                raise ValueError(
                    f"per-sample balancing needs [batch, tokens, E] logits; layer "
                    f"{record.layer!r} has shape {tuple(record.logits.shape)}"
                )
            reduce_dims = tuple(range(1, probs.dim() - 1))
            tokens = token_mask.sum(dim=reduce_dims).clamp_min(1.0)  # [B, 1]
            has_tokens = token_mask.sum(dim=reduce_dims).squeeze(-1) > 0
            fraction = assigned.sum(dim=reduce_dims) / (tokens * record.top_k)
            mean_prob = probs.sum(dim=reduce_dims) / tokens
            per_sample = record.num_experts * (fraction * mean_prob).sum(dim=-1)
            # samples without real tokens do not count; 0 (not NaN) when no sample has any
            losses.append(per_sample[has_tokens].sum() / has_tokens.sum().clamp_min(1))
        else:
            tokens = token_mask.sum().clamp_min(1.0)
            fraction = assigned.flatten(0, -2).sum(0) / (tokens * record.top_k)
            mean_prob = probs.flatten(0, -2).sum(0) / tokens
            losses.append(record.num_experts * (fraction * mean_prob).sum())
    return _mean_or_zero(losses)


def router_z_loss(records: Mapping[str, RoutingRecord], mask: Tensor | None = None) -> Tensor:
    """ST-MoE z-loss: penalises large router logits (mean of logsumexp^2 over real tokens)."""
    losses = []
    for record in records.values():
        token_mask = _token_mask(record, mask)
        z = torch.logsumexp(record.logits.float(), dim=-1).square()
        losses.append((z * token_mask).sum() / token_mask.sum().clamp_min(1.0))
    return _mean_or_zero(losses)


def gate_label_loss(
    records: Mapping[str, RoutingRecord], labels: Tensor, mask: Tensor | None = None, ignore_index: int = -100
) -> Tensor:
    """Mean over layers of the token-level cross-entropy between gate logits [B, T, K] and the
    expert label of each sequence, labels: [B] (see module docstring)."""
    losses = []
    for record in records.values():
        token_mask = _token_mask(record, mask) > 0
        targets = labels.to(record.logits.device).view(-1, *([1] * (record.logits.dim() - 2)))
        targets = targets.expand(record.logits.shape[:-1]).masked_fill(~token_mask, ignore_index)
        if (targets != ignore_index).any():
            losses.append(
                F.cross_entropy(
                    record.logits.float().flatten(0, -2), targets.flatten(), ignore_index=ignore_index
                )
            )
    return _mean_or_zero(losses)


@dataclass
class LayerRoutingStats:
    """Routing of one layer in one batch: expert load fractions (sum to 1), the mean entropy
    of the per-token router distribution (nats), and how many experts got no token."""

    load: Tensor
    entropy: float
    dead_experts: int


@torch.no_grad()
def routing_statistics(
    records: Mapping[str, RoutingRecord], mask: Tensor | None = None
) -> dict[str, LayerRoutingStats]:
    stats = {}
    for name, record in records.items():
        token_mask = _token_mask(record, mask)
        assigned = (_assignment_counts(record) * token_mask[..., None]).flatten(0, -2).sum(0)
        load = assigned / assigned.sum().clamp_min(1.0)
        log_probs = record.logits.float().log_softmax(dim=-1)
        entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
        mean_entropy = (entropy * token_mask).sum() / token_mask.sum().clamp_min(1.0)
        stats[name] = LayerRoutingStats(
            load=load.cpu(), entropy=float(mean_entropy), dead_experts=int((assigned == 0).sum())
        )
    return stats


def _mean_or_zero(losses: list[Tensor]) -> Tensor:
    if not losses:
        return torch.zeros(())
    return torch.stack(losses).mean()

"""Token routers and the side channel they report to.

A router never changes what its layer returns. It hands its logits and choices to a
`RoutingCollector` shared by every adapted layer of one model; the model-level losses and
statistics (see aux_losses.py) are computed once from what the collector captured.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

RouterGradient = Literal["prob", "straight_through"]


@dataclass
class RoutingRecord:
    """What one routed layer decided in one forward pass.

    `logits` is [..., E] and `indices` is [..., k], with the leading dims of the layer input
    (e.g. [batch, seq]), so an attention mask of that shape can select the real tokens.
    """

    layer: str
    logits: Tensor
    indices: Tensor

    @property
    def num_experts(self) -> int:
        return self.logits.shape[-1]

    @property
    def top_k(self) -> int:
        return self.indices.shape[-1]


class RoutingCollector:
    """Collects `RoutingRecord`s during `capture()`; outside it, routers record nothing.

    Records are keyed by layer name, so a layer re-run by activation checkpointing replaces
    its record instead of counting twice.
    """

    def __init__(self) -> None:
        self.records: dict[str, RoutingRecord] = {}
        self.active = False

    @contextmanager
    def capture(self) -> Iterator[dict[str, RoutingRecord]]:
        self.records = {}
        self.active = True
        try:
            yield self.records
        finally:
            self.active = False

    def record(self, record: RoutingRecord) -> None:
        if self.active:
            self.records[record.layer] = record


class TopKRouter(nn.Module):
    """Linear gate over E experts; picks the top-k per token.

    Returns (indices [N, k], weights [N, k], logits [N, E]). Probabilities are computed in at least fp32.
    With k > 1 the chosen probabilities are renormalised to sum to 1; with k == 1 the weight is
    either the probability itself ("prob") or 1 with the probability's gradient
    ("straight_through"), so the router always learns from the task loss.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        top_k: int,
        gradient: RouterGradient = "prob",
        jitter_noise: float = 0.0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.gate = nn.Linear(in_features, num_experts, bias=False, device=device, dtype=dtype)
        self.top_k = top_k
        self.gradient = gradient
        self.jitter_noise = jitter_noise

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.training and self.jitter_noise > 0:
            noise = torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            x = x * noise
        logits = self.gate(x.to(self.gate.weight.dtype))
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 up, float64 stays
        probs = logits.softmax(dim=-1)
        top_probs, indices = probs.topk(self.top_k, dim=-1)
        if self.top_k > 1:
            weights = top_probs / top_probs.sum(dim=-1, keepdim=True)
        elif self.gradient == "straight_through":
            weights = top_probs - top_probs.detach() + 1.0
        else:
            weights = top_probs
        return indices, weights, logits

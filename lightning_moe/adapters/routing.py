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
# the token modalities a task can mark; routers restrict or bias by their index
MODALITIES = ("text", "image", "audio")
SHARED = "shared"  # an expert every modality may use


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
        self.marked: TokenModalities | None = None

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

    @contextmanager
    def modalities(self, marked: TokenModalities) -> Iterator[None]:
        """Routers that know their experts' modalities read the tokens' modalities from here."""
        self.marked = marked
        try:
            yield
        finally:
            self.marked = None


@dataclass
class TokenModalities:
    """Each token's modality (an index into MODALITIES) for the forward passes of one batch.

    `tokens` is [batch, seq] for the prompt or training sequence; `continuation` ([batch]) is the
    modality of tokens past it, the ones generation appends one step at a time (text, or with
    sample-level modalities the sample's own).
    """

    tokens: Tensor
    continuation: Tensor

    def of(self, lead_shape: tuple[int, ...]) -> Tensor:
        """The modalities of a layer input with these leading dims, flattened to [N]."""
        if tuple(lead_shape) == tuple(self.tokens.shape):
            return self.tokens.reshape(-1)
        if len(lead_shape) == 2 and lead_shape[0] == self.continuation.shape[0]:
            return self.continuation[:, None].expand(lead_shape).reshape(-1)
        raise ValueError(
            f"token modalities of shape {tuple(self.tokens.shape)} do not fit a layer input of leading shape "
            f"{tuple(lead_shape)}"
        )


BLOCKED_LOGIT = -1e9  # finite, so entropies and z-losses of restricted routers stay finite


class TopKRouter(nn.Module):
    """Linear gate over E experts; picks the top-k per token.

    Returns (indices [N, k], weights [N, k], logits [N, E]). Probabilities are computed in at least fp32.
    With k > 1 the chosen probabilities are renormalised to sum to 1; with k == 1 the weight is
    either the probability itself ("prob") or 1 with the probability's gradient
    ("straight_through"), so the router always learns from the task loss.

    `input_norm` divides each token by its RMS before the gate (parameter-free), so a router
    whose input is tiny (a down_proj's silu(gate) * up) does not start, and stay, uniform.
    `init_std` sets the gate's initial weights to N(0, std²) instead of nn.Linear's init.
    `forward`'s `logit_bias` ([N, E]) is added to the logits before the choice: a large negative
    value blocks an expert for that token (modality restriction), a positive one favours it.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        top_k: int,
        gradient: RouterGradient = "prob",
        jitter_noise: float = 0.0,
        input_norm: bool = False,
        init_std: float | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.gate = nn.Linear(in_features, num_experts, bias=False, device=device, dtype=dtype)
        if init_std is not None:
            nn.init.normal_(self.gate.weight, std=init_std)
        self.top_k = top_k
        self.gradient = gradient
        self.jitter_noise = jitter_noise
        self.input_norm = input_norm

    def forward(self, x: Tensor, logit_bias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        if self.training and self.jitter_noise > 0:
            noise = torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            x = x * noise
        x = x.to(self.gate.weight.dtype)
        if self.input_norm:
            # eps far below any real activation scale: the point is to rescale tiny inputs
            x = x * torch.rsqrt(x.float().square().mean(dim=-1, keepdim=True) + 1e-12).to(x.dtype)
        logits = self.gate(x)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 up, float64 stays
        if logit_bias is not None:
            logits = logits + logit_bias.to(logits.dtype)
        probs = logits.softmax(dim=-1)
        top_probs, indices = probs.topk(self.top_k, dim=-1)
        if self.top_k > 1:
            weights = top_probs / top_probs.sum(dim=-1, keepdim=True)
        elif self.gradient == "straight_through":
            weights = top_probs - top_probs.detach() + 1.0
        else:
            weights = top_probs
        return indices, weights, logits

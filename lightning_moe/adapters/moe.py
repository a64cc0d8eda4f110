"""kind `moe`: a mixture of LoRA experts behind a token-level top-k router (MoLE: top-1 on the
MLP; MixLoRA: top-2 on the FFN), the experts stored stacked so every backend serves them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from .backends import Backend, expert_backend
from .base import Adapter, register_adapter
from .errors import AdapterConfigError
from .lora import LowRankConfig, kaiming_uniform_rows_
from .routing import RouterGradient, TopKRouter


@dataclass
class MoEConfig(LowRankConfig):
    """A mixture of LoRA experts behind a token-level top-k router (MoLE: top-1; MixLoRA: top-2).

    Args:
        rank: Rank r of every expert.
        alpha: Scaling numerator, as in `LoraConfig`.
        dropout: Dropout on the expert input during training.
        use_rslora: Rank-stabilised scaling alpha / sqrt(r).
        init: Expert init, B = 0: "kaiming" or "gaussian" A, or "eva": expert e's A is the e-th
            slice of the top num_experts * rank directions of the layer's inputs (distinct
            starting subspaces, from the first training batches; see `data_init`).
        num_experts: Number of LoRA experts E (stacked as A: [E, r, in], B: [E, out, r]).
        top_k: Experts per token. With top_k > 1 the chosen probabilities are renormalised.
        router_gradient: For top-1 only: "prob" scales the expert output by its probability
            (the router learns from the task loss through that product); "straight_through"
            uses weight 1 in the forward pass and the probability's gradient in the backward.
        jitter_noise: Multiplicative uniform noise (1 +- eps) on the router input in training.
        backend: Expert compute path: "loop" (reference), "dense" or "grouped", all equal in
            outputs and gradients; "auto" picks the fastest measured for the device, dtype and
            expert count (see `backends.auto_backend`).
    """

    kind: ClassVar[str] = "moe"
    num_experts: int = 4
    top_k: int = 1
    router_gradient: RouterGradient = "prob"
    jitter_noise: float = 0.0
    backend: Backend = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_experts < 1:
            raise AdapterConfigError(f"num_experts must be >= 1, got num_experts={self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise AdapterConfigError(
                f"top_k must be between 1 and num_experts={self.num_experts}, got top_k={self.top_k}"
            )
        self.allow_inits("MoE experts", "kaiming", "gaussian", "eva")
        if self.jitter_noise < 0:
            raise AdapterConfigError(f"jitter_noise must be >= 0, got jitter_noise={self.jitter_noise}")
        if self.router_gradient == "straight_through" and self.top_k > 1:
            raise AdapterConfigError(
                f"router_gradient='straight_through' is defined for top_k=1 only (top_k > 1 renormalises "
                f"the chosen probabilities), got top_k={self.top_k}"
            )


class ExpertBank(nn.Module):
    """E LoRA experts stored stacked (A: [E, r, in], B: [E, out, r]) so one set of weights
    serves every compute backend and shards as one unit."""

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        out_features: int,
        rank: int,
        scaling: float,
        dropout: float = 0.0,
        init: str = "kaiming",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.scaling = scaling
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, rank, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / rank)
            else:
                for expert_A in self.lora_A:  # each expert gets nn.Linear's init for its own [r, in]
                    kaiming_uniform_rows_(expert_A)

    @property
    def num_experts(self) -> int:
        return self.lora_A.shape[0]

    def forward(
        self, x: Tensor, indices: Tensor, weights: Tensor, backend: str = "auto", frozen: Tensor | None = None
    ) -> Tensor:
        """x: [N, in]; indices, weights: [N, k] -> [N, out]. Experts marked in `frozen` ([E] bool)
        act as usual but get no gradient (their weights enter detached)."""
        x = self.dropout(x.to(self.lora_A.dtype))
        weights = (weights * self.scaling).to(x.dtype)
        A, B = self.lora_A, self.lora_B
        if frozen is not None and bool(frozen.any()):
            mask = frozen.view(-1, 1, 1)
            A, B = torch.where(mask, A.detach(), A), torch.where(mask, B.detach(), B)
        compute = expert_backend(backend, x, self.num_experts, indices.shape[-1])
        return compute(x, A, B, indices, weights)


@register_adapter
class MoEAdapter(Adapter):
    """Router + expert bank; the delta of one adapted linear layer.

    The router's decisions go to the collector `inject` binds (when it is capturing) instead of
    changing what this module returns.
    """

    config_class = MoEConfig
    routed = True

    def __init__(self, base_layer: nn.Linear, config: MoEConfig) -> None:
        super().__init__(base_layer, config)
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.router = self.build_router(base_layer, config, factory)
        self.experts = ExpertBank(
            config.num_experts,
            base_layer.in_features,
            base_layer.out_features,
            config.rank,
            config.scaling,
            config.dropout,
            config.init,
            **factory,
        )
        self.backend = config.backend

    def router_parameters(self) -> list[nn.Parameter]:
        return list(self.router.parameters())

    def input_projection(self) -> Tensor:
        """The experts' stacked A ([E, r, in]) that EVA fills, expert by expert."""
        return self.experts.lora_A

    def low_rank_factors(self) -> tuple[nn.Parameter, nn.Parameter, float]:
        """The stacked (A, B, scaling): each expert is its own pair for LoRA-Pro and ALLoRA."""
        return self.experts.lora_A, self.experts.lora_B, self.experts.scaling

    def build_router(self, base_layer: nn.Linear, config: MoEConfig, factory: dict) -> nn.Module:
        return TopKRouter(
            base_layer.in_features,
            config.num_experts,
            config.top_k,
            gradient=config.router_gradient,
            jitter_noise=config.jitter_noise,
            **factory,
        )

    def route(self, flat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.router(flat)

    def frozen_mask(self) -> Tensor | None:
        """Experts that must not train (none here; MoE-Adapters freezes some)."""
        return None

    def forward(self, x: Tensor) -> Tensor:
        lead_shape = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        indices, weights, logits = self.route(flat)
        self.report_routing(lead_shape, logits, indices)
        delta = self.experts(flat, indices, weights, self.backend, self.frozen_mask())
        return delta.view(*lead_shape, delta.shape[-1])

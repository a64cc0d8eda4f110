"""A mixture of LoRA experts: a token router in front of a bank of stacked experts."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .backends import expert_backend
from .config import MoELoraConfig
from .lora import kaiming_uniform_rows_
from .routing import RoutingCollector, RoutingRecord, TopKRouter


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


class MoELoraAdapter(nn.Module):
    """Router + expert bank; the delta of one adapted linear layer.

    `layer_name` and `collector` are set by `inject`: the router's decisions go to the collector
    (when it is capturing) instead of changing what this module returns.
    """

    def __init__(self, base_layer: nn.Linear, config: MoELoraConfig) -> None:
        super().__init__()
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
        self.layer_name = ""
        self.collector: RoutingCollector | None = None

    def build_router(self, base_layer: nn.Linear, config: MoELoraConfig, factory: dict) -> nn.Module:
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
        if self.collector is not None:
            self.collector.record(
                RoutingRecord(self.layer_name, logits.view(*lead_shape, -1), indices.view(*lead_shape, -1))
            )
        delta = self.experts(flat, indices, weights, self.backend, self.frozen_mask())
        return delta.view(*lead_shape, delta.shape[-1])

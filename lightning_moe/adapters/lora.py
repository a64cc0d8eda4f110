"""kind `lora`: plain LoRA, scaling * B @ A @ dropout(x) added to a frozen linear layer; also the
low-rank settings and inits that the other low-rank kinds share."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import Adapter, AdapterConfig, register_adapter
from .errors import AdapterConfigError
from .quantized import QuantizedLinear, dequantized

LoraInit = Literal["kaiming", "gaussian", "pissa", "eva", "lora_ga", "lq_lora"]


@dataclass
class LowRankConfig(AdapterConfig):
    """Fields every low-rank adapter shares (see `LoraConfig` for their meaning)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    init: LoraInit = "kaiming"
    init_batches: int = 8
    eva_tau: float = 0.99
    eva_whiten: bool = False

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise AdapterConfigError(f"rank must be a positive integer, got rank={self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterConfigError(f"dropout must be in [0, 1), got dropout={self.dropout}")
        if self.init_batches < 1:
            raise AdapterConfigError(f"init_batches must be >= 1, got init_batches={self.init_batches}")
        if not 0.0 <= self.eva_tau <= 1.0:
            raise AdapterConfigError(f"eva_tau is a cosine threshold in [0, 1], got eva_tau={self.eva_tau}")

    @property
    def scaling(self) -> float:
        return self.alpha / (self.rank**0.5 if self.use_rslora else self.rank)

    def allow_inits(self, what: str, *inits: str) -> None:
        """For kinds that take only some inits (e.g. PiSSA's fixed principal part fits plain LoRA only)."""
        if self.init not in inits:
            allowed = ", ".join(repr(init) for init in inits)
            raise AdapterConfigError(f"init={self.init!r} does not apply to {what}; use one of {allowed}")


@dataclass
class LoraConfig(LowRankConfig):
    """Plain LoRA: frozen W plus scaling * B @ A.

    Args:
        rank: Rank r of the update.
        alpha: Scaling numerator: scaling = alpha / r (or alpha / sqrt(r) with rsLoRA).
        dropout: Dropout on the adapter input during training.
        use_rslora: Rank-stabilised scaling alpha / sqrt(r).
        init: "kaiming" (A kaiming-uniform, B = 0), "gaussian" (A ~ N(0, 1/r), B = 0),
            "pissa" (A, B from the top-r singular vectors of W; the frozen W is not modified,
            the initial principal part is subtracted instead so the start equals the base model),
            or the data-driven "eva" and "lora_ga", computed from the first training batches
            before step 0 (see `data_init`), or "lq_lora": A, B start as the low-rank part L of
            LQ-LoRA's split W ~ Q + L of the quantised base (needs the model's `quantize`), so the
            start approximates W better than the quantised base alone.
        init_batches: Batches the data-driven inits read at most (EVA stops earlier when every
            layer has converged; LoRA-GA averages the gradient over all of them).
        eva_tau: EVA's convergence threshold: the cosine between a layer's components after
            successive batches.
        eva_whiten: EVA: divide each direction by the square root of its singular value.
        eva_rho: EVA's rank redistribution: a layer may take up to round(rank * eva_rho) ranks
            while the total stays the sum of the rules' ranks (1: no redistribution); alpha
            follows each new rank so the scaling stays that of `rank`.
        lora_ga_gamma: LoRA-GA's stable-scale gamma: A and B times d_out^(1/4) / sqrt(gamma).
        lora_ga_scale: "stable" (the paper's) or "peft" (peft's variant: B = U S times the
            factor, A unscaled).
        lq_iterations: LQ-LoRA's alternations of SVD and quantisation (the best is kept).
        lq_weighting: LQ-LoRA's SVD weighting: "none" or "activations" (each input column by the
            root mean square of its calibration inputs over `init_batches` batches).
    """

    kind: ClassVar[str] = "lora"
    eva_rho: float = 2.0
    lora_ga_gamma: float = 16.0
    lora_ga_scale: Literal["stable", "peft"] = "stable"
    lq_iterations: int = 5
    lq_weighting: Literal["none", "activations"] = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eva_rho < 1.0:
            raise AdapterConfigError(
                f"eva_rho must be >= 1 (1: no rank redistribution), got eva_rho={self.eva_rho}"
            )
        if self.lora_ga_gamma <= 0:
            raise AdapterConfigError(f"lora_ga_gamma must be > 0, got lora_ga_gamma={self.lora_ga_gamma}")
        if self.lq_iterations < 1:
            raise AdapterConfigError(f"lq_iterations must be >= 1, got lq_iterations={self.lq_iterations}")


def kaiming_uniform_rows_(weight: Tensor) -> None:
    """The nn.Linear default init for a [rows, in] matrix (what PEFT uses for lora_A)."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


@torch.no_grad()
def zero_update_init_(lora_A: Tensor, lora_B: Tensor, init: str) -> None:
    """A random ("gaussian": N(0, 1/r); otherwise kaiming-uniform), B = 0: the update starts at 0."""
    if init == "gaussian":
        nn.init.normal_(lora_A, std=1.0 / lora_A.shape[0])
    else:
        kaiming_uniform_rows_(lora_A)
    nn.init.zeros_(lora_B)


@register_adapter
class LoraAdapter(Adapter):
    """Low-rank update of one linear layer: A: [r, in], B: [out, r].

    With PiSSA init, A and B start as the top-r principal part of W. Instead of rewriting the
    frozen W (which would make adapter-only checkpoints depend on a modified base), the initial
    part B0 @ A0 is kept as a buffer and subtracted, so W + s * (B @ A - B0 @ A0) equals PiSSA's
    W_res + s * B @ A with identical gradients.
    """

    config_class = LoraConfig

    def __init__(self, base_layer: nn.Linear, config: LoraConfig) -> None:
        super().__init__(base_layer, config)
        weight = base_layer.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.scaling = config.scaling
        self.lora_A = nn.Parameter(torch.empty(config.rank, base_layer.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(base_layer.out_features, config.rank, **factory))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        # PiSSA and LoRA-GA start from a non-zero product, kept and subtracted (named after PiSSA)
        self.has_initial_offset = config.init in ("pissa", "lora_ga")
        self._initialize(config, base_layer)

    @property
    def mergeable(self) -> bool:
        return True  # the update does not depend on the input

    @torch.no_grad()
    def _initialize(self, config: LoraConfig, base_layer: nn.Linear) -> None:
        zero_update_init_(self.lora_A, self.lora_B, config.init)
        if self.has_initial_offset:
            self.register_buffer("pissa_A0", torch.zeros_like(self.lora_A))
            self.register_buffer("pissa_B0", torch.zeros_like(self.lora_B))
        if config.init == "pissa":
            self.set_initial_factors(*pissa_factors(dequantized(base_layer), config.rank, self.scaling))
        if config.init == "lq_lora":
            self._start_at_base_offset(base_layer)

    @torch.no_grad()
    def _start_at_base_offset(self, base_layer: nn.Linear) -> None:
        offset = base_layer.offset() if isinstance(base_layer, QuantizedLinear) else None
        if offset is None:
            raise AdapterConfigError(
                "init 'lq_lora' starts from the low-rank part of a quantised base; set the model's "
                "`quantize` (e.g. quantize: {scheme: nf4})"
            )
        root = self.scaling**0.5  # scaling * B @ A == offset_B @ offset_A
        self.lora_A.copy_(base_layer.offset_A / root)
        self.lora_B.copy_(base_layer.offset_B / root)

    @torch.no_grad()
    def set_initial_factors(self, lora_A: Tensor, lora_B: Tensor) -> None:
        """Start from A, B (a non-zero product) while the update starts at exactly zero."""
        for name, value in (("lora_A", lora_A), ("lora_B", lora_B)):
            getattr(self, name).copy_(value)
            getattr(self, name.replace("lora", "pissa") + "0").copy_(value)

    def input_projection(self) -> Tensor:
        """The factor EVA fills with input directions ([r, in]; B stays 0)."""
        return self.lora_A

    def low_rank_factors(self) -> tuple[nn.Parameter, nn.Parameter, float]:
        """(A, B, scaling) for optimisers that treat the pair together (LoRA-Pro, ALLoRA)."""
        return self.lora_A, self.lora_B, self.scaling

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.lora_A.dtype)
        delta = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        if self.has_initial_offset:
            delta = delta - F.linear(F.linear(x, self.pissa_A0), self.pissa_B0)
        return delta * self.scaling

    def delta_weight(self) -> Tensor:
        """The dense [out, in] update this adapter adds to W."""
        lora_A, lora_B = self.factors()
        return lora_B @ lora_A * self.scaling

    def factors(self) -> tuple[Tensor, Tensor]:
        """(A, B) with scaling * B @ A this adapter's update (see `lora_factors`)."""
        return lora_factors({name: value.detach() for name, value in self.state_dict().items()})


def lora_factors(tensors: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """A plain LoRA's (A [r', in], B [out, r']) from its tensors (`lora_A`, `lora_B`, and PiSSA's
    `pissa_A0`, `pissa_B0`), such that scaling * B @ A is its whole update: PiSSA's subtracted
    initial part becomes extra rank. Every export and every mixture reads LoRAs through this."""
    lora_A, lora_B = tensors["lora_A"], tensors["lora_B"]
    if "pissa_A0" in tensors:
        lora_A = torch.cat([lora_A, tensors["pissa_A0"]])
        lora_B = torch.cat([lora_B, -tensors["pissa_B0"]], dim=1)
    return lora_A, lora_B


def pissa_factors(weight: Tensor, rank: int, scaling: float) -> tuple[Tensor, Tensor]:
    """Split the top-`rank` singular part U S V^T of W into A0, B0 with scaling * B0 @ A0 == U S V^T."""
    u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    root = (s[:rank] / scaling).sqrt()
    a0 = root[:, None] * vh[:rank]
    b0 = u[:, :rank] * root[None, :]
    return a0.to(weight.dtype), b0.to(weight.dtype)

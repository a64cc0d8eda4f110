"""kind `l4q`: quantisation-aware LoRA (L4Q, Jeon et al. 2024).

The layer computes with Q(W + s B A) instead of W + s B A: Q is LSQ's uniform symmetric b-bit
quantiser (Esser et al. 2020) with one learned step size per group of `group_size` inputs of each
output row. Rounding passes the gradient straight through to W + s B A (so A and B learn through
the quantiser) and the step sizes take LSQ's gradient, round(v) - v for v = w / step inside
[-Qn, Qp] and the bound outside (v is clamped before it is rounded, as in LSQ), scaled by 1 / sqrt(group_size * Qp). Merging writes Q(W + s B A) into the
base weight, so the merged model is exactly the quantised model that trained, and
`integer_codes` gives it as b-bit integers and step sizes (`export-quantized`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import register_adapter
from .errors import AdapterConfigError
from .lora import LoraAdapter, LoraConfig
from .quantized import QuantizedLinear


@dataclass
class L4QConfig(LoraConfig):
    """LoRA's options (rank, alpha, dropout, init kaiming or gaussian), plus:

    Args:
        bits: Bits of the quantised weight (2 to 8), symmetric: integers -2^(b-1) .. 2^(b-1) - 1.
        group_size: Inputs per step size along each output row (0: one step per row); it must
            divide the layer's inputs.
        step_init: "absmax" (each group's max |w| / Qp: round-to-nearest without clipping) or
            "lsq" (LSQ's 2 mean|w| / sqrt(Qp), made for training from scratch: on SmolLM2-135M's
            weights it starts at 0.17 relative error against absmax's 0.11: scripts/quantiser_errors.py).
    """

    kind: ClassVar[str] = "l4q"
    bits: int = 4
    group_size: int = 64
    step_init: Literal["absmax", "lsq"] = "absmax"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.allow_inits("L4Q (its quantiser starts from W)", "kaiming", "gaussian")
        if self.dropout:
            raise AdapterConfigError(
                f"l4q quantises W + s B A as one weight, so there is no adapter input to drop; got dropout={self.dropout}"
            )
        if not 2 <= self.bits <= 8:
            raise AdapterConfigError(f"bits must be between 2 and 8, got bits={self.bits}")
        if self.group_size < 0:
            raise AdapterConfigError(
                f"group_size must be >= 0 (0: a whole row), got group_size={self.group_size}"
            )

    @property
    def levels(self) -> tuple[int, int]:
        """(Qn, Qp): the quantised integers run from -Qn to Qp."""
        return 2 ** (self.bits - 1), 2 ** (self.bits - 1) - 1


def straight_through_round(values: Tensor) -> Tensor:
    return (values.round() - values).detach() + values


def scaled_gradient(tensor: Tensor, scale: float) -> Tensor:
    """`tensor` in the forward pass, its gradient times `scale` in the backward pass."""
    return (tensor - tensor * scale).detach() + tensor * scale


@register_adapter
class L4QAdapter(LoraAdapter):
    """A LoRA whose layer output is F.linear(x, Q(W + s B A)); see the module docstring."""

    config_class = L4QConfig
    replaces_base = True
    low_rank_factors = None  # the quantiser sits between the pair and the output: no LoRA-Pro

    def __init__(self, base_layer: nn.Linear, config: L4QConfig) -> None:
        if isinstance(base_layer, QuantizedLinear):
            raise AdapterConfigError(
                "kind 'l4q' quantises W + s B A itself and needs the full-precision W; remove the model's `quantize`"
            )
        super().__init__(base_layer, config)
        out_features, in_features = base_layer.weight.shape
        self.group_size = config.group_size or in_features
        if in_features % self.group_size:
            raise AdapterConfigError(
                f"l4q group_size={config.group_size} does not divide the layer's {in_features} inputs"
            )
        self.qn, self.qp = config.levels
        groups = base_layer.weight.detach().abs().reshape(out_features, -1, self.group_size)
        step = (
            groups.amax(-1) / self.qp if config.step_init == "absmax" else 2 * groups.mean(-1) / self.qp**0.5
        )
        self.step_size = nn.Parameter(step)
        self.gradient_scale = 1.0 / (self.group_size * self.qp) ** 0.5
        self.fake_quantize = True  # False: compute with W + s B A unquantised (`set_fake_quantization`)

    @property
    def mergeable(self) -> bool:
        return True

    def quantize(self, weight: Tensor) -> Tensor:
        """LSQ fake quantisation of `weight` with this layer's step sizes."""
        step = scaled_gradient(self.step_size, self.gradient_scale).abs().clamp_min(1e-12)[..., None]
        grouped = weight.reshape(*self.step_size.shape, self.group_size)
        codes = straight_through_round(torch.clamp(grouped / step, -self.qn, self.qp))
        return (codes * step).reshape(weight.shape)

    def adapted_weight(self, base_weight: Tensor) -> Tensor:
        """W + s B A, before quantisation (what a plain LoRA would compute with)."""
        return base_weight + self.lora_B @ self.lora_A * self.scaling

    def forward_with_base(self, x: Tensor, base_layer: nn.Linear) -> Tensor:
        weight = self.adapted_weight(base_layer.weight)
        if self.fake_quantize:
            weight = self.quantize(weight)
        return F.linear(x.to(weight.dtype), weight, base_layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        raise AdapterConfigError("an l4q adapter computes the whole layer: call its AdaptedLinear")

    def delta_weight(self) -> Tensor:
        raise AdapterConfigError(
            "an l4q update is Q(W + s B A) - W, not a low-rank delta: merge it into its base, or write "
            "the quantised model with `python -m lightning_moe export-quantized`"
        )

    @torch.no_grad()
    def merged_weight(self, base_weight: Tensor) -> Tensor:
        return self.quantize(self.adapted_weight(base_weight))

    @torch.no_grad()
    def integer_codes(self, base_weight: Tensor) -> tuple[Tensor, Tensor]:
        """(codes int8 [out, in], step sizes [out, groups]) with codes * step = the merged weight."""
        step = self.step_size.abs().clamp_min(1e-12)
        grouped = self.adapted_weight(base_weight).reshape(*step.shape, self.group_size)
        codes = torch.clamp(grouped / step[..., None], -self.qn, self.qp).round()
        return codes.reshape(base_weight.shape).to(torch.int8), step.clone()


def set_fake_quantization(model: nn.Module, enabled: bool) -> int:
    """Switch every l4q layer of `model` between Q(W + s B A) and the unquantised W + s B A;
    returns how many layers it switched."""
    layers = [module for module in model.modules() if isinstance(module, L4QAdapter)]
    for layer in layers:
        layer.fake_quantize = enabled
    return len(layers)

"""kind `dense`: a full-rank update dW (zero at the start) added to a frozen linear layer.

W + dW with only dW trained is full fine-tuning of that layer: the gradient of dW is the
gradient of W, and any optimiser takes the same steps (weight decay then pulls towards the
pretrained W instead of towards zero). It is the reference the low-rank kinds
are compared with (docs/inits.md: intruder dimensions of LoRA against full fine-tuning), and it
saves, merges and exports like every other kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import Adapter, AdapterConfig, register_adapter


@dataclass
class DenseConfig(AdapterConfig):
    """Full fine-tuning of the matched layers, as a trainable update beside the frozen weight."""

    kind: ClassVar[str] = "dense"


@register_adapter
class DenseAdapter(Adapter):
    """delta = x @ dW^T, dW: [out, in], starting at zero."""

    config_class = DenseConfig

    def __init__(self, base_layer: nn.Linear, config: DenseConfig) -> None:
        super().__init__(base_layer, config)
        weight = base_layer.weight  # may be a 4-bit tensor: only its shape, dtype and device
        self.delta = nn.Parameter(torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device))

    @property
    def mergeable(self) -> bool:
        return True

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.to(self.delta.dtype), self.delta)

    def delta_weight(self) -> Tensor:
        return self.delta.detach()

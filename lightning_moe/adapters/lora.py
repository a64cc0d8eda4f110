"""Plain LoRA: the delta scaling * B @ A @ dropout(x) added to a frozen linear layer."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .config import LoraConfig


def kaiming_uniform_rows_(weight: torch.Tensor) -> None:
    """The nn.Linear default init for a [rows, in] matrix (what PEFT uses for lora_A)."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


@torch.no_grad()
def zero_update_init_(lora_A: torch.Tensor, lora_B: torch.Tensor, init: str) -> None:
    """A random ("gaussian": N(0, 1/r); otherwise kaiming-uniform), B = 0: the update starts at 0."""
    if init == "gaussian":
        nn.init.normal_(lora_A, std=1.0 / lora_A.shape[0])
    else:
        kaiming_uniform_rows_(lora_A)
    nn.init.zeros_(lora_B)


class LoraAdapter(nn.Module):
    """Low-rank update of one linear layer: A: [r, in], B: [out, r].

    With PiSSA init, A and B start as the top-r principal part of W. Instead of rewriting the
    frozen W (which would make adapter-only checkpoints depend on a modified base), the initial
    part B0 @ A0 is kept as a buffer and subtracted, so W + s * (B @ A - B0 @ A0) equals PiSSA's
    W_res + s * B @ A with identical gradients.
    """

    mergeable = True  # the update does not depend on the input

    def __init__(self, base_layer: nn.Linear, config: LoraConfig) -> None:
        super().__init__()
        weight = base_layer.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.scaling = config.scaling
        self.lora_A = nn.Parameter(torch.empty(config.rank, base_layer.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(base_layer.out_features, config.rank, **factory))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.has_pissa_offset = config.init == "pissa"
        self._initialize(config, weight)

    @torch.no_grad()
    def _initialize(self, config: LoraConfig, base_weight: torch.Tensor) -> None:
        if config.init == "pissa":
            a0, b0 = pissa_factors(base_weight, config.rank, self.scaling)
            self.lora_A.copy_(a0)
            self.lora_B.copy_(b0)
            self.register_buffer("pissa_A0", a0.clone())
            self.register_buffer("pissa_B0", b0.clone())
            return
        zero_update_init_(self.lora_A, self.lora_B, config.init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.lora_A.dtype)
        delta = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        if self.has_pissa_offset:
            delta = delta - F.linear(F.linear(x, self.pissa_A0), self.pissa_B0)
        return delta * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The dense [out, in] update this adapter adds to W."""
        delta = self.lora_B @ self.lora_A
        if self.has_pissa_offset:
            delta = delta - self.pissa_B0 @ self.pissa_A0
        return delta * self.scaling


def pissa_factors(weight: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the top-`rank` singular part U S V^T of W into A0, B0 with scaling * B0 @ A0 == U S V^T."""
    u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    root = (s[:rank] / scaling).sqrt()
    a0 = root[:, None] * vh[:rank]
    b0 = u[:, :rank] * root[None, :]
    return a0.to(weight.dtype), b0.to(weight.dtype)

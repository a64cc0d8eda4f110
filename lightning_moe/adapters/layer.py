"""`AdaptedLinear`: a frozen linear layer plus the output of one adapter."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Adapter, AdapterConfig, adapter_class
from .errors import AdapterConfigError
from .quantized import QuantizedLinear


def build_adapter(config: AdapterConfig, base_layer: nn.Linear) -> Adapter:
    """The adapter of `config`'s kind for `base_layer` (the registry: `base.ADAPTER_KINDS`)."""
    return adapter_class(config.kind)(base_layer, config)


class AdaptedLinear(nn.Module):
    """Keeps the original layer as `base_layer` (frozen) and adds `adapter(x)` to its output.

    Input-independent updates (plain LoRA, a fixed-weight mixture of LoRAs) can be merged into
    the base weight (then forward is just the base layer) and unmerged again. With `enabled`
    False the layer is its base layer exactly (see `inject.adapters_disabled`).
    """

    def __init__(self, base_layer: nn.Linear, adapter: Adapter, config: AdapterConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.config = config
        self.merged = False
        self.enabled = True

    # Model code sometimes reads these from its linears (dtype checks, tied weights).
    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: Tensor) -> Tensor:
        if self.merged or not self.enabled:
            return self.base_layer(x)
        if self.adapter.replaces_base:
            return self.adapter.forward_with_base(x, self.base_layer)
        out = self.base_layer(x)
        return out + self.adapter(x).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        if isinstance(self.base_layer, QuantizedLinear):
            raise AdapterConfigError(
                f"cannot merge a {self.config.kind} adapter into a 4-bit base layer "
                f"({self.base_layer.quantization['scheme']}); it was trained against the quantised "
                "weights, so merging it into the full-precision model gives another model: keep it "
                "unmerged (adapter folder) or train on a full-precision base"
            )
        if self.adapter.replaces_base:  # the merged weight is not W plus a delta: keep W to unmerge
            self.register_buffer("unmerged_weight", self.base_layer.weight.detach().clone(), persistent=False)
            self.base_layer.weight.copy_(self.adapter.merged_weight(self.unmerged_weight))
        else:
            self.base_layer.weight += self._delta_weight()
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if self.adapter.replaces_base:
            self.base_layer.weight.copy_(self.unmerged_weight)
            del self.unmerged_weight
        else:
            self.base_layer.weight -= self._delta_weight()
        self.merged = False

    @property
    def mergeable(self) -> bool:
        """Whether the update is input-independent, so it can live in the base weight."""
        return self.adapter.mergeable

    def _delta_weight(self) -> Tensor:
        return self.adapter.delta_weight().to(self.base_layer.weight.dtype)

    def extra_repr(self) -> str:
        return f"kind={self.config.kind}, merged={self.merged}"

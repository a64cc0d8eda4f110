"""LoRAM ("Train Small, Infer Large", Zhang et al. 2025): train the adapters on a structurally
pruned base, then recover them to the full model's shapes.

Pruning removes hidden channels of each MLP: rows of its producer linears (gate and up) and the
matching columns of its consumer (down), so the pruned model is an ordinary smaller model. A
channel's score is by `magnitude` (||gate_i|| ||up_i|| ||down_:,i||, the scale of its path) or,
with `calibration`, the root mean square of its activation on calibration batches times
||down_:,i|| (a structured form of Wanda). Recovery puts each trained tensor back at its kept
channels and zeros elsewhere, so the full model keeps its base behaviour on the pruned channels
and gets the trained update on the others; which dimension to expand is read from the shapes the
same adapters have on the full model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from .errors import AdapterCheckpointError, AdapterConfigError


@dataclass
class PruneConfig:
    """Which MLP channels to remove before training.

    Args:
        ratio: Share of each MLP's hidden channels removed (LoRAM: 0.3 - 0.65).
        method: "magnitude" (weights only) or "calibration" (activations of `calibration_batches`
            training batches).
        producers: Names of the linears inside an MLP whose output rows are its channels.
        consumer: Name of the linear inside an MLP whose input columns are its channels.
        multiple_of: Kept channels are rounded down to a multiple of this (block sizes, kernels).
        calibration_batches: Batches the calibration scores read.
    """

    ratio: float = 0.5
    method: Literal["magnitude", "calibration"] = "magnitude"
    producers: list[str] = field(default_factory=lambda: ["gate_proj", "up_proj"])
    consumer: str = "down_proj"
    multiple_of: int = 8
    calibration_batches: int = 8

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise AdapterConfigError(f"prune ratio must be in (0, 1), got ratio={self.ratio}")
        if self.multiple_of < 1 or self.calibration_batches < 1:
            raise AdapterConfigError("prune multiple_of and calibration_batches must be >= 1")


def prunable_mlps(model: nn.Module, config: PruneConfig) -> dict[str, nn.Module]:
    """Every module holding all of `config`'s producer and consumer linears."""
    names = [*config.producers, config.consumer]
    mlps = {
        name: module
        for name, module in model.named_modules()
        if all(isinstance(getattr(module, child, None), nn.Linear) for child in names)
    }
    if not mlps:
        raise AdapterConfigError(
            f"prune: no module of {type(model).__name__} holds linears named {names}; set producers and consumer"
        )
    return mlps


def channel_scores(mlp: nn.Module, config: PruneConfig, activation_rms: Tensor | None = None) -> Tensor:
    consumer = getattr(mlp, config.consumer).weight.detach().float()
    scale = consumer.norm(dim=0)
    if activation_rms is not None:
        return activation_rms.float() * scale
    for name in config.producers:
        scale = scale * getattr(mlp, name).weight.detach().float().norm(dim=1)
    return scale


def kept_channels(scores: Tensor, config: PruneConfig) -> Tensor:
    keep = int(scores.numel() * (1 - config.ratio)) // config.multiple_of * config.multiple_of
    if keep < 1:
        raise AdapterConfigError(
            f"prune ratio={config.ratio} with multiple_of={config.multiple_of} leaves no channel of {scores.numel()}"
        )
    return scores.topk(keep).indices.sort().values


@torch.no_grad()
def prune_mlps(model: nn.Module, config: PruneConfig, scores: dict[str, Tensor]) -> dict[str, Tensor]:
    """Replace each MLP's linears by their kept channels, in place; returns {linear name: kept
    channel indices} for every producer and consumer."""
    kept = {}
    for name, mlp in prunable_mlps(model, config).items():
        channels = kept_channels(scores[name], config)
        for child in [*config.producers, config.consumer]:
            linear = getattr(mlp, child)
            rows = child != config.consumer
            weight = linear.weight.index_select(0 if rows else 1, channels)
            bias = linear.bias if linear.bias is None or not rows else linear.bias.index_select(0, channels)
            smaller = nn.Linear(
                weight.shape[1],
                weight.shape[0],
                bias=bias is not None,
                device=weight.device,
                dtype=weight.dtype,
            )
            smaller.weight.copy_(weight)
            if bias is not None:
                smaller.bias.copy_(bias)
            smaller.train(linear.training).requires_grad_(linear.weight.requires_grad)
            setattr(mlp, child, smaller)
            kept[f"{name}.{child}" if name else child] = channels
    return kept


def recover_tensor(pruned: Tensor, full_shape: torch.Size, channels: Tensor, key: str) -> Tensor:
    """`pruned` placed at `channels` along the one dimension where its shape differs from
    `full_shape`, zeros elsewhere."""
    differing = [d for d, (a, b) in enumerate(zip(pruned.shape, full_shape, strict=True)) if a != b]
    if not differing:
        return pruned
    if len(differing) > 1 or pruned.shape[differing[0]] != channels.numel():
        raise AdapterCheckpointError(
            f"cannot recover {key!r}: pruned shape {list(pruned.shape)} against full {list(full_shape)}"
        )
    full = pruned.new_zeros(full_shape)
    full.index_copy_(differing[0], channels.to(pruned.device), pruned)
    return full


def recover_state(
    pruned_state: dict[str, Tensor], full_shapes: dict[str, torch.Size], kept: dict[str, Tensor]
) -> dict[str, Tensor]:
    """Adapter tensors of the pruned model ('<layer>.<tensor>') at the full model's shapes."""
    if set(pruned_state) != set(full_shapes):
        raise AdapterCheckpointError("the pruned and the full model's adapters have different tensors")
    recovered = {}
    for key, tensor in pruned_state.items():
        layer = next((name for name in kept if key.startswith(f"{name}.")), None)
        recovered[key] = (
            tensor if layer is None else recover_tensor(tensor, full_shapes[key], kept[layer], key)
        )
    return recovered

"""LoRAM for any adapter task (`prune:` in the model config): the base is pruned before the
adapters attach, they train on the small model, and the export recovers them to the full
model's shapes with the full model's fingerprint, so the folder loads onto the unpruned base."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_moe.adapters.adapter_folder import layer_fingerprint
from lightning_moe.adapters.data_init import input_rms
from lightning_moe.adapters.inject import adapted_layers, plan_injection
from lightning_moe.adapters.layer import build_adapter
from lightning_moe.adapters.pruning import (
    PruneConfig,
    channel_scores,
    prunable_mlps,
    prune_mlps,
    recover_state,
)
from lightning_moe.adapters.rules import AdapterRule
from lightning_moe.quantized_base import Calibration


@dataclass
class PrunedBase:
    """What recovery needs: kept channels and full (in, out) features by linear, and the full
    model's fingerprints of the layers the rules adapt."""

    kept: dict[str, Tensor]
    full_features: dict[str, tuple[int, int]]
    full_prints: dict[str, dict]


def prune_model(
    model: nn.Module, config: PruneConfig, rules: list[AdapterRule], calibration: Calibration
) -> PrunedBase:
    """Prune `model`'s MLPs in place, scored from their weights or from calibration batches, and
    keep what recovery needs (taken before pruning, from the full model)."""
    mlps = prunable_mlps(model, config)
    consumers = {f"{name}.{config.consumer}": mlp for name, mlp in mlps.items()}
    rms = {}
    if config.method == "calibration":
        batches, forward = calibration()
        linears = {name: getattr(mlp, config.consumer) for name, mlp in consumers.items()}
        rms = input_rms(linears, batches, forward, config.calibration_batches)
    scores = {
        name: channel_scores(mlp, config, rms.get(f"{name}.{config.consumer}")) for name, mlp in mlps.items()
    }
    full_prints = {
        name: layer_fingerprint(model.get_submodule(name)) for name in plan_injection(model, rules)
    }
    before = sum(p.numel() for p in model.parameters())
    features = {
        name: (m.in_features, m.out_features) for name, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    kept = prune_mlps(model, config, scores)
    after = sum(p.numel() for p in model.parameters())
    channels = [channels.numel() for name, channels in kept.items() if name.endswith(config.consumer)]
    full = features[next(iter(consumers))][0]
    rank_zero_info(
        f"pruned {len(mlps)} MLPs ({config.method}) to {min(channels)}-{max(channels)} of {full} channels; "
        f"the base keeps {after / before:.3f} of its parameters"
    )
    return PrunedBase(kept, {name: features[name] for name in kept}, full_prints)


def recovered_adapter_state(
    model: nn.Module, pruned: PrunedBase, state: dict[str, Tensor]
) -> dict[str, Tensor]:
    """The (gathered) adapter `state` of the pruned `model` at the full model's shapes: each
    layer's shapes are those of a fresh adapter of its config on a full-size linear."""
    full_shapes = {}
    for name, layer in adapted_layers(model):
        size = pruned.full_features.get(name)
        linear = (
            layer.base_layer
            if size is None
            else nn.Linear(*size, bias=False, dtype=layer.base_layer.weight.dtype)
        )
        with torch.random.fork_rng(devices=[]):
            fresh = build_adapter(layer.config, linear)
        full_shapes |= {f"{name}.{key}": value.shape for key, value in fresh.state_dict().items()}
    return recover_state(state, full_shapes, pruned.kept)

"""The frozen base in 4 bits for any adapter task (`quantize:` in the model config).

The base is quantised before the adapters attach, so every adapter kind sees an ordinary linear
whose weight happens to be NF4. A fresh LQ-LoRA run first splits each of its layers into Q + L;
an adapter folder trained on such a base carries L's factors (`quantized_base.safetensors`),
from which the same Q is rebuilt before its fingerprint is checked.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_moe.adapters.adapter_folder import read_base_offsets
from lightning_moe.adapters.data_init import Forward, input_rms
from lightning_moe.adapters.inject import plan_injection
from lightning_moe.adapters.lora import LoraConfig
from lightning_moe.adapters.quantized import QuantizeConfig, QuantizedLinear, lq_decompose, quantize_base
from lightning_moe.adapters.rules import AdapterRule

Calibration = Callable[[], tuple[Iterable, Forward]]  # -> (training batches, batch -> (loss, mask))


def lq_lora_layers(model: nn.Module, rules: list[AdapterRule]) -> dict[str, LoraConfig]:
    """The layers the rules give a LoRA with `init: lq_lora`."""
    plan = plan_injection(model, rules)
    return {name: config for name, config in plan.items() if getattr(config, "init", None) == "lq_lora"}


def lq_lora_offsets(
    model: nn.Module, config: QuantizeConfig, rules: list[AdapterRule], calibration: Calibration
) -> dict[str, tuple[Tensor, Tensor]]:
    """LQ-LoRA's (A0, B0) for every layer that asks for it, weighted by calibration inputs where
    its rule says `lq_weighting: activations`."""
    layers = lq_lora_layers(model, rules)
    weighted = {
        name: model.get_submodule(name) for name, c in layers.items() if c.lq_weighting == "activations"
    }
    column_weights = {}
    if weighted:
        batches, forward = calibration()
        count = max(layers[name].init_batches for name in weighted)
        column_weights = input_rms(weighted, batches, forward, count)
    offsets, errors, start = {}, [], time.perf_counter()
    for name, layer_config in layers.items():
        weight = model.get_submodule(name).weight
        a0, b0, trace = lq_decompose(
            weight, layer_config.rank, config, layer_config.lq_iterations, column_weights.get(name)
        )
        offsets[name] = (a0, b0)
        errors.append((trace[0], min(trace)))
    if errors:
        first, best = (sum(column) / len(errors) for column in zip(*errors, strict=True))
        rank_zero_info(
            f"LQ-LoRA split of {len(errors)} layers: mean relative (weighted) error {first:.4f} after the "
            f"first alternation, {best:.4f} at the best one ({time.perf_counter() - start:.0f} s)"
        )
    return offsets


def quantize_model(
    model: nn.Module,
    config: QuantizeConfig,
    rules: list[AdapterRule],
    adapter_path: str | None,
    calibration: Calibration,
) -> dict[str, QuantizedLinear]:
    """Quantise `model`'s base in place: with LQ-LoRA's split for a fresh run, with the split an
    adapter folder recorded when one is loaded."""
    offsets = (
        read_base_offsets(adapter_path)
        if adapter_path
        else lq_lora_offsets(model, config, rules, calibration)
    )
    layers = quantize_base(model, config, offsets)
    rank_zero_info(quantization_summary(layers))
    return layers


def quantization_summary(layers: dict[str, QuantizedLinear]) -> str:
    if not layers:
        return "quantize: no linear layer to quantise (all skipped or tied)"
    errors = {name: layer.relative_error for name, layer in layers.items()}
    worst = max(errors, key=errors.get)
    low_rank = sum(1 for layer in layers.values() if layer.quantization["low_rank"])
    scheme = next(iter(layers.values())).quantization["scheme"]
    split = f", {low_rank} of them as Q + L (LQ-LoRA)" if low_rank else ""
    return (
        f"quantized {len(layers)} linear layers to {scheme}{split}; relative reconstruction error "
        f"||W - W_q|| / ||W||: mean {sum(errors.values()) / len(errors):.4f}, max {errors[worst]:.4f} ({worst})"
    )

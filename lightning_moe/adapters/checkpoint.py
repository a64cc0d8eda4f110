"""Adapter checkpoints: `adapter_config.json` + `adapter_model.safetensors`, adapter weights only.

The config records the injection rules (so loading rebuilds the same adapters) and a small
fingerprint of every adapted base layer (its shape and first values), so an adapter saved
from another base model is refused with the name of the first layer that differs.
Nothing is ever unpickled.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import AdapterRule
from .errors import AdapterCheckpointError, AdapterConfigError
from .files import (
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    check_weight_fingerprint,
    read_adapter_config,
    read_safetensors,
    weight_fingerprint,
    write_adapter_folder,
)
from .inject import InjectionReport, adapted_layers, inject
from .layer import AdaptedLinear


def layers_state_dict(layers: Iterable[tuple[str, AdaptedLinear]]) -> dict[str, Tensor]:
    """Adapter tensors only, keyed '<adapted module>.<adapter tensor>' (e.g. '...up_proj.router.gate.weight')."""
    state = {}
    for name, layer in layers:
        for key, value in layer.adapter.state_dict().items():
            state[f"{name}.{key}"] = value
    return state


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    return layers_state_dict(adapted_layers(model))


def base_fingerprint(model: nn.Module) -> dict[str, dict]:
    prints = {}
    for name, layer in adapted_layers(model):
        if layer.merged:
            raise AdapterConfigError(f"layer {name!r} is merged; unmerge the adapters before saving them")
        prints[name] = weight_fingerprint(layer.base_layer.weight)
    return prints


def save_adapter(
    model: nn.Module,
    rules: list[AdapterRule],
    folder: str | os.PathLike,
    base_model: str = "",
    overwrite: bool = False,
) -> Path:
    """Write the adapters of `model` (injected with `rules`) to `folder`, atomically.

    An existing adapter in `folder` is only replaced when `overwrite` is set.
    """
    return write_adapter(
        adapter_state_dict(model), model, rules, base_fingerprint(model), folder, base_model, overwrite
    )


def write_adapter(
    state: dict[str, Tensor],
    model: nn.Module,
    rules: list[AdapterRule],
    fingerprint: dict[str, dict],
    folder: str | os.PathLike,
    base_model: str = "",
    overwrite: bool = False,
) -> Path:
    """`save_adapter` from tensors gathered elsewhere (e.g. from the shards of a sharded model)."""
    if not state:
        raise AdapterConfigError(f"{type(model).__name__} has no adapters to save; call inject() first")
    config = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "base_model": base_model,
        "rules": [rule.to_dict() for rule in rules],
        "modules": {name: layer.config.kind for name, layer in adapted_layers(model)},
        "fingerprint": fingerprint,
    }
    return write_adapter_folder(folder, state, config, overwrite)


def target_layer(model: nn.Module, name: str, source: str) -> nn.Module:
    """The layer `name` that an adapter file adapts, or an error naming it."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise AdapterCheckpointError(
            f"{source} adapts layer {name!r}, which {type(model).__name__} does not have"
        ) from None


def check_fingerprint(model: nn.Module, fingerprint: dict[str, dict], source: str) -> None:
    """Refuse an adapter whose recorded base layers are missing, shaped or valued differently."""
    for name, expected in fingerprint.items():
        check_weight_fingerprint(name, target_layer(model, name, source).weight, expected, source)


def load_adapter(model: nn.Module, folder: str | os.PathLike, freeze_base: bool = True) -> InjectionReport:
    """Inject the adapters saved in `folder` into a freshly built base `model` and load their weights."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterCheckpointError(f"adapter folder {folder} does not exist")
    config = read_adapter_config(folder)
    try:
        rules = [AdapterRule.from_dict(rule) for rule in config["rules"]]
    except (KeyError, TypeError, AdapterConfigError) as error:
        raise AdapterCheckpointError(f"{folder / CONFIG_FILE} has invalid rules: {error}") from error
    check_fingerprint(model, config.get("fingerprint", {}), str(folder))
    tensors = read_safetensors(folder / WEIGHTS_FILE)
    source = str(folder / WEIGHTS_FILE)
    return inject(
        model,
        rules,
        freeze_base=freeze_base,
        prepare=lambda layers: copy_adapter_tensors(layers.items(), tensors, source),
    )


def load_adapter_weights(model: nn.Module, folder: str | os.PathLike) -> None:
    """Load saved adapter weights into a model that already has the same adapters injected."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    check_fingerprint(model, config.get("fingerprint", {}), str(folder))
    present = {name: layer.config.kind for name, layer in adapted_layers(model)}
    for name, kind in config.get("modules", {}).items():
        if present.get(name) != kind:
            raise AdapterCheckpointError(
                f"{folder} holds a {kind!r} adapter for {name!r}, but the model has {present.get(name)!r} there"
            )
    copy_adapter_tensors(
        adapted_layers(model), read_safetensors(folder / WEIGHTS_FILE), str(folder / WEIGHTS_FILE)
    )


@torch.no_grad()
def copy_adapter_tensors(
    layers: Iterable[tuple[str, AdaptedLinear]], tensors: dict[str, Tensor], source: str
) -> None:
    """Copy `tensors` into the layers' adapters; every key must exist on both sides with equal shape."""
    targets = layers_state_dict(layers)
    missing = sorted(set(targets) - set(tensors))
    unexpected = sorted(set(tensors) - set(targets))
    if missing:
        raise AdapterCheckpointError(f"{source} lacks adapter tensor {missing[0]!r} ({len(missing)} missing)")
    if unexpected:
        raise AdapterCheckpointError(
            f"{source} has tensor {unexpected[0]!r}, which this model's adapters do not have ({len(unexpected)} extra)"
        )
    for key, target in targets.items():
        if tensors[key].shape != target.shape:
            raise AdapterCheckpointError(
                f"{source}: tensor {key!r} has shape {list(tensors[key].shape)}, the adapter expects {list(target.shape)}"
            )
    for key, target in targets.items():
        target.copy_(tensors[key])

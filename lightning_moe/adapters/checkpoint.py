"""Adapter checkpoints: `adapter_config.json` + `adapter_model.safetensors`, adapter weights only.

The config records the injection rules (so loading rebuilds the same adapters) and a small
fingerprint of every adapted base layer (its shape and first values), so an adapter saved
from another base model is refused with the name of the first layer that differs.
Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .config import AdapterRule
from .errors import AdapterCheckpointError, AdapterConfigError
from .inject import InjectionReport, adapted_layers, inject
from .layer import AdaptedLinear

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT = "lightning_moe.adapter"
FORMAT_VERSION = 1
_FINGERPRINT_VALUES = 16


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
        weight = layer.base_layer.weight.detach()
        head = weight.flatten()[:_FINGERPRINT_VALUES].float().cpu().tolist()
        prints[name] = {"shape": list(weight.shape), "head": head}
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
    state = adapter_state_dict(model)
    if not state:
        raise AdapterConfigError(f"{type(model).__name__} has no adapters to save; call inject() first")
    config = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "base_model": base_model,
        "rules": [rule.to_dict() for rule in rules],
        "modules": {name: layer.config.kind for name, layer in adapted_layers(model)},
        "fingerprint": base_fingerprint(model),
    }
    return write_adapter_folder(folder, state, config, overwrite)


def write_adapter_folder(
    folder: str | os.PathLike, tensors: dict[str, Tensor], config: dict, overwrite: bool = False
) -> Path:
    """Write CONFIG_FILE + WEIGHTS_FILE atomically; an existing adapter is replaced only with `overwrite`."""
    folder = Path(folder)
    if not overwrite and any((folder / f).exists() for f in (CONFIG_FILE, WEIGHTS_FILE)):
        raise FileExistsError(f"{folder} already holds an adapter; pass overwrite=True to replace it")
    tensors = {key: value.detach().contiguous().cpu() for key, value in tensors.items()}
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".adapter-", dir=folder))
    try:
        save_file(tensors, staging / WEIGHTS_FILE, metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            os.replace(staging / name, folder / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def read_config_object(folder: Path, what: str) -> dict:
    """The JSON object in `folder`/CONFIG_FILE, or an AdapterCheckpointError saying what is wrong."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterCheckpointError(f"no {CONFIG_FILE} in {what} folder {folder}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterCheckpointError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise AdapterCheckpointError(f"{path} holds a JSON {type(config).__name__}, expected an object")
    return config


def read_adapter_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / CONFIG_FILE
    config = read_config_object(Path(folder), "adapter")
    if config.get("format") != FORMAT:
        raise AdapterCheckpointError(
            f"{path} is not a lightning_moe adapter (format {config.get('format')!r}, "
            f"expected {FORMAT!r}); PEFT adapters load with import_peft()"
        )
    if config.get("version") != FORMAT_VERSION:
        raise AdapterCheckpointError(
            f"{path} has format version {config.get('version')!r}; expected {FORMAT_VERSION}"
        )
    return config


def read_safetensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise AdapterCheckpointError(f"adapter weights file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open has no iterator)
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterCheckpointError(f"{path} is not a readable safetensors file: {error}") from error


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
        weight = target_layer(model, name, source).weight.detach()
        if list(weight.shape) != expected["shape"]:
            raise AdapterCheckpointError(
                f"{source} was saved for a base whose {name!r} has shape {expected['shape']}, "
                f"this model's is {list(weight.shape)}"
            )
        head = weight.flatten()[:_FINGERPRINT_VALUES].float().cpu()
        if not torch.allclose(head, torch.tensor(expected["head"]), rtol=2e-2, atol=1e-6):
            raise AdapterCheckpointError(
                f"{source} was saved from a different base model: the weights of {name!r} differ"
            )


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

"""The adapter folder: `adapter_config.json` + `adapter_model.safetensors`, adapter weights only.

The config records the injection rules (so loading rebuilds the same adapters), the kind of
every adapted module, and a small fingerprint of every adapted base layer (its shape and first
values), so an adapter saved from another base model is refused with the name of the first layer
that differs. This module is the one reader and writer of that format: rules, fingerprints,
tensors; mixtures add their expert folders' content hashes to their own config.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import AdapterCheckpointError, AdapterConfigError
from .files import read_json_object, read_safetensors, write_folder_files
from .inject import InjectionReport, adapted_layers, inject
from .layer import AdaptedLinear
from .quantized import QuantizedLinear, dequantized
from .rules import AdapterRule

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
BASE_OFFSETS_FILE = "quantized_base.safetensors"  # LQ-LoRA: the low-rank parts taken out of W
FORMAT = "lightning_moe.adapter"
FORMAT_VERSION = 1
_FINGERPRINT_VALUES = 16


# --- fingerprints of the base -------------------------------------------------------------------
def layer_fingerprint(linear: nn.Module) -> dict:
    """Shape and first values of the weight a base layer computes with; a quantised layer also
    records how it is stored (scheme, blocks, LQ-LoRA rank) and its reconstruction error."""
    weight = dequantized(linear)
    head = weight.detach().flatten()[:_FINGERPRINT_VALUES].float().cpu().tolist()
    prints = {"shape": list(weight.shape), "head": head}
    if isinstance(linear, QuantizedLinear):
        prints |= {"quantization": linear.quantization, "relative_error": linear.relative_error}
    return prints


def describe_storage(prints: Mapping) -> str:
    quantization = prints.get("quantization")
    if quantization is None:
        return "not quantised"
    low_rank = f" with a rank-{quantization['low_rank']} LQ-LoRA part" if quantization["low_rank"] else ""
    embeddings = " and 4-bit embeddings" if quantization.get("embeddings") else ""
    return f"{quantization['scheme']} (blocks of {quantization['block_size']}){low_rank}{embeddings}"


def base_fingerprint(model: nn.Module) -> dict[str, dict]:
    """The fingerprint of every adapted base layer, as adapter folders and checkpoints record it."""
    prints = {}
    for name, layer in adapted_layers(model):
        if layer.merged:
            raise AdapterConfigError(f"layer {name!r} is merged; unmerge the adapters before saving them")
        prints[name] = layer_fingerprint(layer.base_layer)
    return prints


def check_fingerprints(current: Mapping[str, dict], recorded: Mapping[str, dict], source: str) -> None:
    """Refuse `source` (an adapter folder, a checkpoint, an expert) whose recorded base layers are
    missing from `current` (this model's fingerprints by layer name) or shaped or valued differently."""
    for name, expected in recorded.items():
        if name not in current:
            raise AdapterCheckpointError(f"{source} adapts layer {name!r}, which this model does not adapt")
        actual = current[name]
        if actual["shape"] != expected["shape"]:
            raise AdapterCheckpointError(
                f"{source} was saved for a base whose {name!r} has shape {expected['shape']}, "
                f"this model's is {actual['shape']}"
            )
        if actual.get("quantization") != expected.get("quantization"):
            raise AdapterCheckpointError(
                f"{source} was trained on a base stored as {describe_storage(expected)}; this model's "
                f"{name!r} is {describe_storage(actual)} (set the model's `quantize` to match)"
            )
        if not torch.allclose(
            torch.tensor(actual["head"]), torch.tensor(expected["head"]), rtol=2e-2, atol=1e-6
        ):
            raise AdapterCheckpointError(
                f"{source} was saved from a different base model: the weights of {name!r} differ"
            )


def target_layer(model: nn.Module, name: str, source: str) -> nn.Module:
    """The layer `name` that an adapter file adapts, or an error naming it."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise AdapterCheckpointError(
            f"{source} adapts layer {name!r}, which {type(model).__name__} does not have"
        ) from None


def check_base(model: nn.Module, recorded: Mapping[str, dict], source: str) -> None:
    """`check_fingerprints` against the layers of a (not yet adapted) model."""
    current = {name: layer_fingerprint(target_layer(model, name, source)) for name in recorded}
    check_fingerprints(current, recorded, source)


# --- reading ------------------------------------------------------------------------------------
def is_our_adapter(config: dict) -> bool:
    return config.get("format") == FORMAT


def read_config_object(folder: Path, what: str) -> dict:
    """The JSON object in `folder`/adapter_config.json (ours or PEFT's), or one clear error."""
    return read_json_object(Path(folder) / CONFIG_FILE, what)


def read_adapter_config(folder: str | os.PathLike) -> dict:
    """Our adapter_config.json, its format and version checked."""
    path = Path(folder) / CONFIG_FILE
    config = read_config_object(Path(folder), "adapter")
    if not is_our_adapter(config):
        raise AdapterCheckpointError(
            f"{path} is not a lightning_moe adapter (format {config.get('format')!r}, "
            f"expected {FORMAT!r}); PEFT adapters load with import_peft()"
        )
    if config.get("version") != FORMAT_VERSION:
        raise AdapterCheckpointError(
            f"{path} has format version {config.get('version')!r}; expected {FORMAT_VERSION}"
        )
    return config


def read_rules(folder: str | os.PathLike, config: dict | None = None) -> list[AdapterRule]:
    """The injection rules an adapter folder was saved with."""
    config = config if config is not None else read_adapter_config(folder)
    try:
        return [AdapterRule.from_dict(rule) for rule in config["rules"]]
    except (KeyError, TypeError, AdapterConfigError) as error:
        raise AdapterCheckpointError(f"{Path(folder) / CONFIG_FILE} has invalid rules: {error}") from error


def read_weights(folder: str | os.PathLike) -> dict[str, Tensor]:
    return read_safetensors(Path(folder) / WEIGHTS_FILE)


def folder_sha256(folder: Path) -> str:
    """Hash of the config and weights files together: any change to either changes it."""
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        with (folder / name).open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# --- the adapter tensors of a model ------------------------------------------------------------
def layers_state_dict(layers: Iterable[tuple[str, AdaptedLinear]]) -> dict[str, Tensor]:
    """Adapter tensors only, keyed '<adapted module>.<adapter tensor>' (e.g. '...up_proj.router.gate.weight')."""
    state = {}
    for name, layer in layers:
        for key, value in layer.adapter.state_dict().items():
            state[f"{name}.{key}"] = value
    return state


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    return layers_state_dict(adapted_layers(model))


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


def base_offset_files(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """LQ-LoRA's (A0, B0) of every quantised base layer that has them: with W they rebuild Q."""
    offsets = {}
    for name, layer in adapted_layers(model):
        base = layer.base_layer
        if isinstance(base, QuantizedLinear) and base.quantization["low_rank"]:
            offsets |= {f"{name}.offset_A": base.offset_A, f"{name}.offset_B": base.offset_B}
    return {BASE_OFFSETS_FILE: offsets} if offsets else {}


def read_base_offsets(folder: str | os.PathLike) -> dict[str, tuple[Tensor, Tensor]]:
    """{layer: (A0, B0)} of an adapter folder trained on an LQ-LoRA base ({} for any other)."""
    path = Path(folder) / BASE_OFFSETS_FILE
    if not path.is_file():
        return {}
    tensors = read_safetensors(path)
    names = {key.rsplit(".", 1)[0] for key in tensors}
    try:
        return {name: (tensors[f"{name}.offset_A"], tensors[f"{name}.offset_B"]) for name in names}
    except KeyError as missing:
        raise AdapterCheckpointError(f"{path} lacks tensor {missing}") from None


# --- saving and loading --------------------------------------------------------------------------
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
    extra_weights: dict[str, dict[str, Tensor]] | None = None,
) -> Path:
    """`save_adapter` from tensors gathered elsewhere (e.g. from the shards of a sharded model);
    `extra_weights` are more safetensors files written in the same step (e.g. a projector)."""
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
    weights = {WEIGHTS_FILE: state} | base_offset_files(model) | (extra_weights or {})
    return write_folder_files(folder, weights, {CONFIG_FILE: json.dumps(config, indent=2)}, overwrite)


def load_adapter(model: nn.Module, folder: str | os.PathLike, freeze_base: bool = True) -> InjectionReport:
    """Inject the adapters saved in `folder` into a freshly built base `model` and load their weights."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterCheckpointError(f"adapter folder {folder} does not exist")
    config = read_adapter_config(folder)
    saved = read_rules(folder, config)
    rules = [AdapterRule(rule.targets, rule.config.for_saved_weights(), rule.regex) for rule in saved]
    check_base(model, config.get("fingerprint", {}), str(folder))
    tensors = read_weights(folder)
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
    check_base(model, config.get("fingerprint", {}), str(folder))
    present = {name: layer.config.kind for name, layer in adapted_layers(model)}
    for name, kind in config.get("modules", {}).items():
        if present.get(name) != kind:
            raise AdapterCheckpointError(
                f"{folder} holds a {kind!r} adapter for {name!r}, but the model has {present.get(name)!r} there"
            )
    copy_adapter_tensors(adapted_layers(model), read_weights(folder), str(folder / WEIGHTS_FILE))

"""The factors of trained plain LoRAs: of a model's LoRA layers (for the PEFT and diffusers
exports), and of adapter folders, ours or PEFT's (for the mixtures).

All come out through `lora.lora_factors`, A: [r, in] and B: [out, r] with scaling * B @ A the
update; folders give B with the module's scaling folded in, so `B @ A` is exactly the update.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from .adapter_folder import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    folder_sha256,
    is_our_adapter,
    read_adapter_config,
    read_config_object,
    read_rules,
    read_weights,
)
from .errors import AdapterCheckpointError, AdapterConfigError
from .files import read_safetensors
from .inject import adapted_layers
from .lora import LoraAdapter, LoraConfig, lora_factors

PEFT_PREFIX = "base_model.model."
_PEFT_KEY = re.compile(rf"{re.escape(PEFT_PREFIX)}(.+)\.lora_([AB])(?:\.[^.]+)?\.weight")


@dataclass
class PeftLoraLayer:
    """One module of a PEFT LoRA adapter: its factors as stored and its LoRA settings."""

    lora_A: Tensor
    lora_B: Tensor
    config: LoraConfig


@dataclass
class PretrainedLora:
    """A trained LoRA adapter: `factors[module] = (A, B)` with scaling folded into B.

    `fingerprint` (our format only) ties it to its base model; `sha256` identifies the files.
    """

    folder: Path
    factors: dict[str, tuple[Tensor, Tensor]]
    fingerprint: dict[str, dict]
    sha256: str


def read_pretrained_lora(folder: str | Path) -> PretrainedLora:
    """Read a plain-LoRA adapter folder in our format or PEFT's; anything else is one clear error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterCheckpointError(f"LoRA adapter folder {folder} does not exist")
    config = read_config_object(folder, "LoRA adapter")
    if is_our_adapter(config):
        factors, fingerprint = _our_factors(folder)
    else:
        layers = read_peft_lora(folder, config)
        factors = {
            name: (layer.lora_A, layer.lora_B * layer.config.scaling) for name, layer in layers.items()
        }
        fingerprint = {}
    return PretrainedLora(folder, factors, fingerprint, folder_sha256(folder))


def _our_factors(folder: Path) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, dict]]:
    config = read_adapter_config(folder)
    rules = read_rules(folder, config)
    tensors = read_weights(folder)
    factors = {}
    for name in config.get("modules", {}):
        rule = next((r for r in rules if r.matches(name)), None)
        if rule is None or not isinstance(rule.config, LoraConfig):
            kind = rule.config.kind if rule else "unknown"
            raise AdapterCheckpointError(
                f"{folder} holds a {kind!r} adapter on {name!r}; only plain-LoRA adapters can be mixed as experts"
            )
        own = {
            key.removeprefix(f"{name}."): value
            for key, value in tensors.items()
            if key.startswith(f"{name}.")
        }
        if "lora_A" not in own or "lora_B" not in own:
            missing = f"{name}.lora_A" if "lora_A" not in own else f"{name}.lora_B"
            raise AdapterCheckpointError(f"{folder / WEIGHTS_FILE} lacks tensor {missing!r}")
        lora_A, lora_B = lora_factors(own)
        factors[name] = (lora_A, lora_B * rule.config.scaling)
    return factors, config.get("fingerprint", {})


def plain_lora_layers(model: nn.Module, export: str) -> Iterator[tuple[str, Tensor, Tensor, float]]:
    """(module name, A, B, scaling) of every adapted layer, for an `export` that takes plain LoRA
    only: any other kind, or no LoRA at all, is one error."""
    found = False
    for name, layer in adapted_layers(model):
        if not isinstance(layer.adapter, LoraAdapter):
            raise AdapterConfigError(
                f"{export} supports plain LoRA only; layer {name!r} has a {layer.config.kind!r} adapter"
            )
        found = True
        lora_A, lora_B = layer.adapter.factors()
        yield name, lora_A, lora_B, layer.adapter.scaling
    if not found:
        raise AdapterConfigError(f"{type(model).__name__} has no LoRA adapters to export")


def read_peft_lora(folder: Path, config: dict | None = None) -> dict[str, PeftLoraLayer]:
    """The modules of a PEFT LoRA folder, refusing what plain LoRA cannot represent."""
    config = _check_peft_config(folder, config or read_config_object(folder, "PEFT adapter"))
    if not (folder / WEIGHTS_FILE).is_file() and (folder / "adapter_model.bin").is_file():
        raise AdapterCheckpointError(
            f"{folder} holds a pickled adapter_model.bin; convert it to safetensors (we never unpickle)"
        )
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, value in read_safetensors(folder / WEIGHTS_FILE).items():
        match = _PEFT_KEY.fullmatch(key)
        if match is None:
            raise AdapterCheckpointError(f"{folder / WEIGHTS_FILE}: tensor {key!r} is not a LoRA factor")
        pairs.setdefault(match.group(1), {})[match.group(2)] = value
    layers = {}
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise AdapterCheckpointError(f"{folder / WEIGHTS_FILE}: module {module!r} lacks lora_A or lora_B")
        lora = LoraConfig(
            rank=pair["A"].shape[0],
            alpha=float(
                _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
            ),
            dropout=float(config.get("lora_dropout", 0.0)),
            use_rslora=bool(config.get("use_rslora", False)),
        )
        layers[module] = PeftLoraLayer(pair["A"], pair["B"], lora)
    return layers


def _check_peft_config(folder: Path, config: dict) -> dict:
    path = folder / CONFIG_FILE
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterCheckpointError(
            f"{path} has peft_type {peft_type!r}; expected a PEFT 'LORA' adapter or a lightning_moe adapter"
        )
    for option in ("use_dora", "fan_in_fan_out"):
        if config.get(option) is True:
            raise AdapterCheckpointError(
                f"{path} sets {option}=True, which plain-LoRA import does not support"
            )
    if config.get("bias", "none") != "none" or config.get("modules_to_save"):
        raise AdapterCheckpointError(
            f"{path} trains biases or whole modules; only LoRA factors can be imported"
        )
    return config


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: a pattern key applies to modules whose name ends with it."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def check_factor_shapes(module: str, lora_A: Tensor, lora_B: Tensor, layer: nn.Module, source: str) -> None:
    """Refuse factors that do not fit `layer` (A: [r, in], B: [out, r]): a LoRA for another base."""
    rank = lora_A.shape[0]
    expected_a, expected_b = (rank, layer.in_features), (layer.out_features, rank)
    if tuple(lora_A.shape) != expected_a or tuple(lora_B.shape) != expected_b:
        raise AdapterCheckpointError(
            f"{source}: LoRA factors of {module!r} have shapes {list(lora_A.shape)} and {list(lora_B.shape)}; "
            f"this model's layer needs {list(expected_a)} and {list(expected_b)}"
        )

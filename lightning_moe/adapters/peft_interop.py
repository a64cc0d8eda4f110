"""Plain-LoRA interchange with the PEFT format (`adapter_config.json` + `adapter_model.safetensors`).

PEFT keys look like 'base_model.model.<module>.lora_A.weight' ([r, in]) and '...lora_B.weight'
([out, r]); its scaling is lora_alpha / r (or / sqrt(r) with use_rslora), per module through
rank_pattern / alpha_pattern. We export with use_rslora off and alpha = scaling * r per module,
which reproduces every module's scaling (to one float rounding step) whatever our settings were.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    read_config_object,
    read_safetensors,
    target_layer,
    write_adapter_folder,
)
from .config import AdapterRule, LoraConfig
from .errors import AdapterCheckpointError, AdapterConfigError
from .inject import InjectionReport, adapted_layers, inject
from .lora import LoraAdapter

PEFT_PREFIX = "base_model.model."


def _peft_factors(adapter: LoraAdapter) -> tuple[Tensor, Tensor]:
    """(A, B) such that scaling * B @ A is this adapter's update; PiSSA's offset becomes extra rank."""
    a, b = adapter.lora_A.detach(), adapter.lora_B.detach()
    if adapter.has_pissa_offset:
        a = torch.cat([a, adapter.pissa_A0])
        b = torch.cat([b, -adapter.pissa_B0], dim=1)
    return a, b


def export_peft(
    model: nn.Module,
    folder: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the model's plain-LoRA adapters so that `peft.PeftModel.from_pretrained` loads them."""
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    dropouts = set()
    for name, layer in adapted_layers(model):
        if not isinstance(layer.adapter, LoraAdapter):
            raise AdapterConfigError(
                f"PEFT export supports plain LoRA only; layer {name!r} has a {layer.config.kind!r} adapter"
            )
        a, b = _peft_factors(layer.adapter)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b
        ranks[name] = a.shape[0]
        alphas[name] = layer.adapter.scaling * a.shape[0]
        dropouts.add(layer.config.dropout)
    if not tensors:
        raise AdapterConfigError(f"{type(model).__name__} has no LoRA adapters to export")
    rank, _ = Counter(ranks.values()).most_common(1)[0]
    alpha, _ = Counter(alphas.values()).most_common(1)[0]
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": max(dropouts),
        "target_modules": sorted(ranks),
        "rank_pattern": {name: r for name, r in ranks.items() if r != rank},
        "alpha_pattern": {name: a for name, a in alphas.items() if a != alpha},
        "use_rslora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    return write_adapter_folder(folder, tensors, config, overwrite)


def _peft_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    config = read_config_object(folder, "PEFT adapter")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterCheckpointError(f"{path} has peft_type {peft_type!r}; only 'LORA' is supported")
    unsupported = {
        "use_dora": True,
        "fan_in_fan_out": True,
    }
    for option, bad in unsupported.items():
        if config.get(option) == bad:
            raise AdapterCheckpointError(
                f"{path} sets {option}={bad}, which plain-LoRA import does not support"
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


def import_peft(model: nn.Module, folder: str | os.PathLike, freeze_base: bool = True) -> InjectionReport:
    """Inject a PEFT LoRA adapter folder into `model` as our plain-LoRA adapters, weights included."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterCheckpointError(f"PEFT adapter folder {folder} does not exist")
    config = _peft_config(folder)
    if not (folder / WEIGHTS_FILE).is_file() and (folder / "adapter_model.bin").is_file():
        raise AdapterCheckpointError(
            f"{folder} holds a pickled adapter_model.bin; convert it to safetensors (we never unpickle)"
        )
    tensors = read_safetensors(folder / WEIGHTS_FILE)
    factors: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        match = re.fullmatch(rf"{re.escape(PEFT_PREFIX)}(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if match is None:
            raise AdapterCheckpointError(f"{folder / WEIGHTS_FILE}: tensor {key!r} is not a LoRA factor")
        factors.setdefault(match.group(1), {})[match.group(2)] = value
    rules = []
    for module, pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise AdapterCheckpointError(f"{folder / WEIGHTS_FILE}: module {module!r} lacks lora_A or lora_B")
        rank = pair["A"].shape[0]
        lora = LoraConfig(
            rank=rank,
            alpha=float(
                _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
            ),
            dropout=float(config.get("lora_dropout", 0.0)),
            use_rslora=bool(config.get("use_rslora", False)),
        )
        rules.append(AdapterRule(targets=[re.escape(module)], adapter=lora, regex=True))
    _check_shapes(model, factors, folder)
    report = inject(model, rules, freeze_base=freeze_base)
    with torch.no_grad():
        for module, pair in factors.items():
            adapter = model.get_submodule(module).adapter
            adapter.lora_A.copy_(pair["A"])
            adapter.lora_B.copy_(pair["B"])
    return report


def _check_shapes(model: nn.Module, factors: dict[str, dict[str, Tensor]], folder: Path) -> None:
    for module, pair in factors.items():
        layer = target_layer(model, module, str(folder))
        expected_a = (pair["A"].shape[0], layer.in_features)
        expected_b = (layer.out_features, pair["A"].shape[0])
        if tuple(pair["A"].shape) != expected_a or tuple(pair["B"].shape) != expected_b:
            raise AdapterCheckpointError(
                f"{folder}: LoRA factors of {module!r} have shapes {list(pair['A'].shape)} and {list(pair['B'].shape)}; "
                f"this model's layer needs {list(expected_a)} and {list(expected_b)}"
            )

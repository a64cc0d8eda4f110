"""Plain-LoRA interchange with the PEFT format (`adapter_config.json` + `adapter_model.safetensors`).

PEFT keys look like 'base_model.model.<module>.lora_A.weight' ([r, in]) and '...lora_B.weight'
([out, r]); its scaling is lora_alpha / r (or / sqrt(r) with use_rslora), per module through
rank_pattern / alpha_pattern. We export with use_rslora off and alpha = scaling * r per module,
which reproduces every module's scaling (to one float rounding step) whatever our settings were.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor, nn

from .adapter_folder import CONFIG_FILE, WEIGHTS_FILE, target_layer
from .errors import AdapterCheckpointError
from .files import write_folder_files
from .inject import InjectionReport, inject
from .lora_factors import PEFT_PREFIX, PeftLoraLayer, check_factor_shapes, plain_lora_layers, read_peft_lora
from .rules import AdapterRule


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
    for name, lora_A, lora_B, scaling in plain_lora_layers(model, "PEFT export"):
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = lora_A
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = lora_B
        ranks[name] = lora_A.shape[0]
        alphas[name] = scaling * lora_A.shape[0]
        dropouts.add(model.get_submodule(name).config.dropout)
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
    return write_folder_files(
        folder, {WEIGHTS_FILE: tensors}, {CONFIG_FILE: json.dumps(config, indent=2)}, overwrite
    )


def import_peft(model: nn.Module, folder: str | os.PathLike, freeze_base: bool = True) -> InjectionReport:
    """Inject a PEFT LoRA adapter folder into `model` as our plain-LoRA adapters, weights included."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterCheckpointError(f"PEFT adapter folder {folder} does not exist")
    layers = read_peft_lora(folder)
    _check_shapes(model, layers, folder)
    rules = [
        AdapterRule(targets=[re.escape(module)], adapter=layer.config, regex=True)
        for module, layer in layers.items()
    ]
    report = inject(model, rules, freeze_base=freeze_base)
    with torch.no_grad():
        for module, layer in layers.items():
            adapter = model.get_submodule(module).adapter
            adapter.lora_A.copy_(layer.lora_A)
            adapter.lora_B.copy_(layer.lora_B)
    return report


def _check_shapes(model: nn.Module, layers: dict[str, PeftLoraLayer], folder: Path) -> None:
    for module, peft_layer in layers.items():
        check_factor_shapes(
            module,
            peft_layer.lora_A,
            peft_layer.lora_B,
            target_layer(model, module, str(folder)),
            str(folder),
        )

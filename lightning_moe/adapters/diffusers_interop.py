"""Plain-LoRA export in the layout diffusers' `load_lora_weights` reads.

A pipeline folder holds `pytorch_lora_weights.safetensors` with keys
'<component>.<module>.lora_A.weight' ([r, in]) and '...lora_B.weight' ([out, r]), the component
being e.g. "unet". diffusers builds its LoRA config from those shapes with alpha = r, so the
scaling is folded into B here and every module keeps its exact update.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor, nn

from .files import write_folder_files
from .lora_factors import plain_lora_layers

DIFFUSERS_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"


def export_diffusers_lora(
    model: nn.Module, folder: str | os.PathLike, component: str = "unet", overwrite: bool = False
) -> Path:
    """Write the plain-LoRA adapters of `model` (the pipeline's `component`, e.g. its UNet) so that
    `pipeline.load_lora_weights(folder)` loads them."""
    tensors: dict[str, Tensor] = {}
    for name, lora_A, lora_B, scaling in plain_lora_layers(model, "diffusers export"):
        tensors[f"{component}.{name}.lora_A.weight"] = lora_A
        tensors[f"{component}.{name}.lora_B.weight"] = lora_B * scaling
    return write_folder_files(folder, {DIFFUSERS_WEIGHTS_FILE: tensors}, {}, overwrite)

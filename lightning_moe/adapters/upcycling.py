"""MoE experts that start from trained LoRAs (`expert_init`): Uni-MoE's progressive recipe trains
modality-specific LoRAs first, then a mixture whose experts begin as those LoRAs."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from .adapter_folder import check_fingerprints, layer_fingerprint
from .errors import AdapterCheckpointError
from .lora_factors import PretrainedLora, check_factor_shapes, read_pretrained_lora
from .moe import MoEAdapter


def upcycle_experts(layers: Mapping[str, nn.Module]) -> None:
    """Start the experts of every MoE layer with `expert_init` from those LoRA folders (each read
    once). A folder made for another base (layer shapes or fingerprint) or with a larger rank than
    the experts' is refused, naming it; a layer the folder does not adapt keeps its fresh expert."""
    read: dict[str, PretrainedLora] = {}
    for name, layer in layers.items():
        folders = getattr(layer.config, "expert_init", None)
        if not isinstance(layer.adapter, MoEAdapter) or not folders:
            continue
        for expert, folder in enumerate(folders):
            if folder is None:
                continue
            if folder not in read:
                read[folder] = read_pretrained_lora(folder)
            lora = read[folder]
            if name not in lora.factors:
                continue
            lora_A, lora_B = lora.factors[name]
            check_factor_shapes(name, lora_A, lora_B, layer.base_layer, folder)
            if lora_A.shape[0] > layer.config.rank:
                raise AdapterCheckpointError(
                    f"expert_init {folder}: its LoRA at {name!r} has rank {lora_A.shape[0]}, more than the "
                    f"experts' rank={layer.config.rank}"
                )
            if name in lora.fingerprint:
                check_fingerprints(
                    {name: layer_fingerprint(layer.base_layer)}, {name: lora.fingerprint[name]}, folder
                )
            layer.adapter.start_expert_from(expert, lora_A, lora_B)

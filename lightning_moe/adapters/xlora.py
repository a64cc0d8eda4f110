"""kind `xlora`: X-LoRA, frozen pre-trained LoRAs mixed per token by a small gate, in one forward
pass (each adapted layer's gate reads that layer's own input; the packing, the gate and the
expert folders are shared with MeteoRA, see lora_mixture.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import register_adapter
from .lora_mixture import LoraMixtureAdapter, LoraMixtureConfig


@dataclass
class XLoraConfig(LoraMixtureConfig):
    """X-LoRA: frozen pre-trained LoRAs mixed per token by a small gating classifier.

    Args:
        experts: Expert adapter folders, ours or PEFT (`adapter_config.json` +
            `adapter_model.safetensors`), in gate order.
        expert_sha256: Content hashes of the expert folders, filled in when they are first loaded
            and checked on every later load (a changed expert behind a saved gate is refused).
        top_k: Keep only the k largest mixing weights per token (renormalised); None mixes all.
        temperature: Softmax temperature of the gate.
        gate_hidden: Width of the gate's hidden layer (0: a single linear layer).
        gate_dropout: Dropout on the gate's hidden layer during training.
        fixed_weights: Instead of a trained gate, the same weights for every token (e.g. a uniform
            [0.25, 0.25, 0.25, 0.25] is the merged average; a one-hot picks one expert).
        expert_tasks: The task (data `domain`) each expert was trained on, for the supervised gate
            loss (`router_loss.label_coef`).
        backend: Expert compute path ("auto", "loop", "dense" or "grouped"); all agree.
    """

    kind: ClassVar[str] = "xlora"


@register_adapter
class XLoraAdapter(LoraMixtureAdapter):
    """A gate over all K packed experts, mixing every one of them (or its top_k) per token; a
    fresh gate starts uniform, so an untrained X-LoRA is the merged average of its experts."""

    config_class = XLoraConfig

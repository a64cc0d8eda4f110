"""kind `meteora`: MeteoRA, a linear gate per adapted layer picks the top-k of the packed frozen
LoRAs per token (the packing, the gate and the expert folders are shared with X-LoRA, see
lora_mixture.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import register_adapter
from .lora_mixture import LoraMixtureAdapter, LoraMixtureConfig


@dataclass
class MeteoraConfig(LoraMixtureConfig):
    """MeteoRA: the top-k of the packed frozen LoRAs per token (weights renormalised over the
    chosen k), trained with the LM loss and optionally a supervised loss towards each sample's
    task (`expert_tasks` + `router_loss.label_coef`).

    Args:
        experts: Expert adapter folders, ours or PEFT, in gate order.
        expert_sha256: Content hashes of the expert folders (filled in and checked, see XLoraConfig).
        top_k: Experts per token.
        temperature: Softmax temperature of the gate.
        gate_hidden: Width of a hidden gate layer (0: linear, as in MeteoRA).
        gate_dropout: Dropout on the gate's hidden layer during training.
        fixed_weights: Instead of a trained gate, the same weights for every token.
        expert_tasks: The task (data `domain`) each expert was trained on.
        backend: Expert compute path ("auto", "loop", "dense" or "grouped"); all agree.
    """

    kind: ClassVar[str] = "meteora"
    top_k: int | None = 2


@register_adapter
class MeteoraAdapter(LoraMixtureAdapter):
    """A gate that routes each token to its top-k packed experts."""

    config_class = MeteoraConfig

"""Multimodal instruction tuning (LLaVA-MoLE, Uni-MoE): a vision encoder (and optionally an audio
encoder), projectors and a causal LM with LoRA, MoLE or modality-aware experts, trained on
visual (and spoken) instructions and scored per domain."""

from lightning_moe.tasks.multimodal.audio_encoder import SpokenDigitTask
from lightning_moe.tasks.multimodal.visual_instruction import VisualInstructionTask

__all__ = ["SpokenDigitTask", "VisualInstructionTask"]

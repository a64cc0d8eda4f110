"""Multimodal instruction tuning (LLaVA-MoLE): a vision encoder, a projector and a causal LM
with LoRA or MoLE, trained on visual instructions and scored per domain."""

from lightning_moe.tasks.multimodal.visual_instruction import VisualInstructionTask

__all__ = ["VisualInstructionTask"]

"""Diffusion LoRA composition: a small text-to-image base, concept LoRAs on it, the ways to
compose them (merge, switch, composite, a learned gate, CLoRA and LoRA-Composer), and a judge of
what the images show."""

from lightning_moe.tasks.diffusion.callbacks import ImagePredictionWriter
from lightning_moe.tasks.diffusion.compositions import Composite, Merge, Switch
from lightning_moe.tasks.diffusion.concept_compositions import CLoRA, LoRAComposer
from lightning_moe.tasks.diffusion.concept_judge import ConceptJudge, ConceptJudgeTask
from lightning_moe.tasks.diffusion.text_to_image import TextToImageTask, UNetTrainingTask

__all__ = [
    "CLoRA",
    "Composite",
    "ConceptJudge",
    "ConceptJudgeTask",
    "ImagePredictionWriter",
    "LoRAComposer",
    "Merge",
    "Switch",
    "TextToImageTask",
    "UNetTrainingTask",
]

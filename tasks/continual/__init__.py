"""Continual learning with CLIP: a packaged CLIP and its alignment stage, streams learned task by
task with the accuracy matrix and the continual-learning metrics, and the benchmark suite command
(`python -m lightning_moe suite`)."""

from lightning_moe.tasks.continual.callbacks import RankGateShrinkage
from lightning_moe.tasks.continual.clip_alignment import ClipAlignmentTask
from lightning_moe.tasks.continual.continual_clip import ContinualClipTask

__all__ = ["ClipAlignmentTask", "ContinualClipTask", "RankGateShrinkage"]

"""The alignment stage of the composed CLIP (LiT-style, Zhai et al., 2022: "locked-image tuning").

Both pretrained towers stay frozen; only the two new linear projections and the temperature
train, contrastively, on captioned images (`AlignmentDataModule`). Generated captions repeat
(one per class and template), so a batch often holds the same caption several times: the loss
treats every pair with the same caption as a positive (targets spread over them) instead of
pushing identical captions apart as plain InfoNCE would. Validation reports zero-shot accuracy
per source with prompt-ensembled class heads. The frozen image trunk's features are computed
once per image and reused (only the projection head runs after the first epoch). The export is the whole CLIP's weights
(`clip.safetensors`), which the continual-learning configs read through `clip_path`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy

from lightning_moe.data.clip_alignment import AlignmentDataModule
from lightning_moe.errors import UserInputError
from lightning_moe.task import TaskModule
from lightning_moe.tasks.continual.clip_models import ImageFeatureCache, build_clip, save_clip, zero_shot_head


def projection_parameters(clip: nn.Module) -> list[nn.Parameter]:
    """What LiT trains: the temperature and the two projections into the shared embedding (a
    timm image tower's head or a ViT's `proj`; an HF text tower's `proj` or `text_projection`)."""
    image = list(clip.visual.head.parameters()) if hasattr(clip.visual, "head") else [clip.visual.proj]
    text = list(clip.text.proj.parameters()) if hasattr(clip, "text") else [clip.text_projection]
    return [clip.logit_scale, *image, *text]


def multi_positive_contrastive_loss(
    image: Tensor, text: Tensor, captions: list[str], scale: Tensor
) -> Tensor:
    """Symmetric cross-entropy over the batch's image-text similarities, with every pair of
    identical captions a positive."""
    index = {caption: number for number, caption in enumerate(dict.fromkeys(captions))}
    ids = torch.tensor([index[caption] for caption in captions], device=image.device)
    same = (ids[:, None] == ids[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)
    logits = scale * image @ text.T
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


class ClipAlignmentTask(TaskModule):
    """Trains a CLIP's projections (and temperature) with the towers frozen.

    Args:
        clip: "packaged" (EfficientNet-Lite0 + MiniLM) or "open_clip:<model>/<tag>".
        clip_config: Instead: open_clip.CLIP arguments for a random model (tests).
        embed_dim: Width of the shared embedding of the packaged CLIP.
        image_size: Image side the vision tower sees; the CLI links it from the data module's.
        data: The captioned alignment images (the CLI links the data module here); validation
            scores zero-shot accuracy on each of its sources.
        cache_dir: Where packaged assets are cached.
        **kwargs: Optimisation settings of `TaskModule`.
    """

    def __init__(
        self,
        clip: str = "packaged",
        clip_config: dict[str, Any] | None = None,
        embed_dim: int = 256,
        image_size: int = 128,
        data: AlignmentDataModule | None = None,
        cache_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if data is None:
            raise UserInputError(
                "ClipAlignmentTask aligns on captioned images: give data: AlignmentDataModule"
            )
        self.data = data
        self.clip_name = clip
        self.clip_config = clip_config
        self.embed_dim = embed_dim
        self.image_size = image_size
        self.cache_dir = cache_dir
        self.accuracy = nn.ModuleList()
        self.heads: list[Tensor] = []
        self.image_features = ImageFeatureCache()

    def build_model(self) -> nn.Module:
        clip = build_clip(
            self.clip_name, self.clip_config, None, self.embed_dim, self.image_size, self.cache_dir
        )
        clip.requires_grad_(False)  # the towers stay as they are
        for parameter in projection_parameters(clip.clip):
            parameter.requires_grad_(True)
        return clip

    def export(self, folder: str, base_model: str = "", overwrite: bool = False) -> None:
        if self.global_rank == 0:
            save_clip(self.model, folder, overwrite)

    def task_loss(self, batch: dict) -> tuple[Tensor, Tensor | None]:
        image = self.image_features(self.model, batch["image"], batch["key"].tolist())
        if not self.training:
            self.score_zero_shot(image, batch)
        text = self.model.encode_texts(list(batch["caption"]))
        scale = self.model.clip.logit_scale.exp().clamp(max=100)
        return multi_positive_contrastive_loss(image, text, list(batch["caption"]), scale), None

    def on_validation_epoch_start(self) -> None:
        tasks = self.data.tasks
        self.heads = [zero_shot_head(self.model, task.class_names, task.templates) for task in tasks]
        if len(self.accuracy) != len(tasks):
            self.accuracy = nn.ModuleList(
                MulticlassAccuracy(num_classes=len(task.class_names), average="micro").to(self.device)
                for task in tasks
            )

    def score_zero_shot(self, image: Tensor, batch: dict) -> None:
        for source, head in enumerate(self.heads):
            rows = batch["source"] == source
            if rows.any():
                self.accuracy[source].update((image[rows] @ head.T).argmax(-1), batch["label"][rows])

    def on_validation_epoch_end(self) -> None:
        for task, metric in zip(self.data.tasks, self.accuracy, strict=True):
            if metric.update_called:  # a short (sanity-check) validation may not reach every source
                self.log(f"val/zero_shot/{task.name}", metric.compute())
            metric.reset()

"""Concept judges: a small CNN that says which object a (generated) image shows and which styles
are drawn on it, trained on the packaged image sources with the styles applied at random.

It is how composed concept LoRAs are scored (presence.py): an image of "a handwritten digit,
inverted, framed" counts as showing each concept the judge finds, and a canvas judge names the
object of each slot. The backbone is any timm model (trained from scratch here: no
pretrained weights for 24-32 px grayscale); one linear head classifies the object, one gives a
logit per style.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.classification import BinaryAccuracy, MulticlassAccuracy

from lightning_moe.adapters.files import read_safetensors, write_folder_files
from lightning_moe.data.captioned_images import judged_objects, judged_styles
from lightning_moe.errors import UserInputError
from lightning_moe.task import TaskModule

JUDGE_WEIGHTS = "judge.safetensors"
JUDGE_CONFIG = "judge.json"


class ConceptJudge(nn.Module):
    """backbone -> (object logits [B, objects], style logits [B, styles])."""

    def __init__(self, backbone: str, object_names: list[str], style_names: list[str], seed: int) -> None:
        super().__init__()
        self.object_names = list(object_names)
        self.style_names = list(style_names)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.backbone = timm.create_model(backbone, pretrained=False, in_chans=1, num_classes=0)
            self.objects = nn.Linear(self.backbone.num_features, len(object_names))
            # a judge of no styles has no style head (an empty Linear would warn at its init)
            self.styles = nn.Linear(self.backbone.num_features, len(style_names)) if style_names else None

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features = self.backbone(images)
        styles = self.styles(features) if self.styles is not None else features.new_zeros(len(features), 0)
        return self.objects(features), styles

    @torch.no_grad()
    def judge(self, images: Tensor) -> dict[str, Tensor]:
        """Images in [-1, 1] -> the object index and a 0/1 verdict per style, per image."""
        objects, styles = self(images)
        return {"object": objects.argmax(-1)} | {
            name: (styles[:, column] > 0).long() for column, name in enumerate(self.style_names)
        }


def save_concept_judge(
    judge: ConceptJudge, backbone: str, folder: str | os.PathLike, overwrite: bool = False
) -> Path:
    config = {"backbone": backbone, "object_names": judge.object_names, "style_names": judge.style_names}
    return write_folder_files(
        folder, {JUDGE_WEIGHTS: judge.state_dict()}, {JUDGE_CONFIG: json.dumps(config, indent=2)}, overwrite
    )


def load_concept_judge(folder: str | os.PathLike) -> ConceptJudge:
    """A trained judge from the folder its training run exported, in eval mode."""
    path = Path(folder) / JUDGE_CONFIG
    if not path.is_file():
        raise UserInputError(
            f"no concept judge in {folder} (no {JUDGE_CONFIG}); train one with "
            "python -m lightning_moe fit --config configs/judges/concept_judge.yaml"
        )
    config = json.loads(path.read_text())
    judge = ConceptJudge(config["backbone"], config["object_names"], config["style_names"], seed=0)
    judge.load_state_dict(read_safetensors(Path(folder) / JUDGE_WEIGHTS))
    return judge.eval()


class ConceptJudgeTask(TaskModule):
    """Trains a `ConceptJudge` on a `StyledImageDataModule` (object cross-entropy plus, if it
    judges styles, one binary cross-entropy per style); validation reports object and per-style
    accuracy.

    Args:
        sources: The image sources whose objects the judge tells apart; the CLI links it from
            the data module's `sources`.
        styles: The styles it looks for (None: every known style); linked from the data module.
        backbone: A timm model name (random init, one input channel).
        model_seed: Seed of the initialisation.
        **kwargs: Optimisation settings of `TaskModule`.
    """

    def __init__(
        self,
        sources: list[str] | None = None,
        styles: list[str] | None = None,
        backbone: str = "resnet10t",
        model_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.object_names = judged_objects(list(sources or ["fashion-mnist", "mnist-5k"]))
        self.style_names = judged_styles(styles)
        self.backbone = backbone
        self.model_seed = model_seed
        self.object_accuracy: MulticlassAccuracy | None = None
        self.style_accuracy = nn.ModuleDict()

    def build_model(self) -> nn.Module:
        judge = ConceptJudge(self.backbone, self.object_names, self.style_names, self.model_seed)
        # torchmetrics wants two classes or more; a one-object judge (tests) is trivially right
        self.object_accuracy = MulticlassAccuracy(
            num_classes=max(2, len(judge.object_names)), average="micro"
        )
        self.style_accuracy = nn.ModuleDict({name: BinaryAccuracy() for name in judge.style_names})
        return judge

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"model": self.model} if self.model is not None else {}

    def export(self, folder: str, base_model: str = "", overwrite: bool = False) -> None:
        if self.global_rank == 0:
            save_concept_judge(self.model, self.backbone, folder, overwrite)

    def task_loss(self, batch: dict) -> tuple[Tensor, Tensor | None]:
        objects, styles = self.model(batch["image"])
        loss = F.cross_entropy(objects, batch["object"])
        if self.model.style_names:  # the mean over no style logits would be NaN
            loss = loss + F.binary_cross_entropy_with_logits(styles, batch["styles"])
        if not self.training:
            self.object_accuracy.to(self.device).update(objects.argmax(-1), batch["object"])
            for column, name in enumerate(self.model.style_names):
                self.style_accuracy[name].update(styles[:, column], batch["styles"][:, column].long())
        return loss, None

    def on_validation_epoch_end(self) -> None:
        self.log("val/object_accuracy", self.object_accuracy.compute())
        self.object_accuracy.reset()
        for name, metric in self.style_accuracy.items():
            self.log(f"val/{name}_accuracy", metric.compute())
            metric.reset()

"""The audio encoder of the Uni-MoE-style model: log-mel features -> a few audio tokens.

No pretrained speech encoder ships in any package, so this one is small and trained first
(stage 0, `SpokenDigitTask`): a 1-D CNN over time, with the mel bands as channels, classifies
spoken digits. Its exported folder is then the frozen audio encoder of `VisualInstructionTask`
(`audio_encoder:`), connected through its own projector as the image encoder is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy

from lightning_moe.adapters.errors import AdapterCheckpointError
from lightning_moe.adapters.files import read_safetensors, write_folder_files
from lightning_moe.data.spoken_digits import DIGIT_WORDS, MELS
from lightning_moe.errors import UserInputError
from lightning_moe.task import TaskModule

ENCODER_WEIGHTS = "audio_encoder.safetensors"
ENCODER_CONFIG = "audio_encoder.json"


class AudioEncoder(nn.Module):
    """Log-mel features [B, MELS, frames] -> audio tokens [B, tokens, width].

    Each utterance's features are standardised on their own (loudness and recording level
    differ); three convolutions (the last two with stride 2) and an average pool over time to
    `tokens` positions follow.
    """

    def __init__(self, width: int = 128, tokens: int = 8, seed: int = 0) -> None:
        super().__init__()
        self.num_features = width
        self.tokens = tokens
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.layers = nn.Sequential(
                nn.Conv1d(MELS, width, 5, padding=2),
                nn.GELU(),
                nn.Conv1d(width, width, 5, stride=2, padding=2),
                nn.GELU(),
                nn.Conv1d(width, width, 5, stride=2, padding=2),
                nn.GELU(),
                nn.AdaptiveAvgPool1d(tokens),
            )

    def forward(self, features: Tensor) -> Tensor:
        mean = features.mean(dim=(1, 2), keepdim=True)
        std = features.std(dim=(1, 2), keepdim=True)
        return self.layers((features - mean) / (std + 1e-5)).transpose(1, 2)


class SpokenDigitClassifier(nn.Module):
    """The encoder with a linear head on its mean token: [B, MELS, frames] -> digit logits [B, 10]."""

    def __init__(self, width: int, tokens: int, seed: int) -> None:
        super().__init__()
        self.encoder = AudioEncoder(width, tokens, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            self.head = nn.Linear(width, len(DIGIT_WORDS))

    def forward(self, features: Tensor) -> Tensor:
        return self.head(self.encoder(features).mean(dim=1))


def save_audio_encoder(encoder: AudioEncoder, folder: str | os.PathLike, overwrite: bool = False) -> Path:
    config = {"width": encoder.num_features, "tokens": encoder.tokens}
    return write_folder_files(
        folder, {ENCODER_WEIGHTS: encoder.state_dict()}, {ENCODER_CONFIG: json.dumps(config)}, overwrite
    )


def load_audio_encoder(folder: str | os.PathLike) -> AudioEncoder:
    """A trained encoder from the folder its stage-0 run exported, frozen and in eval mode."""
    path = Path(folder) / ENCODER_CONFIG
    if not path.is_file():
        raise UserInputError(
            f"no audio encoder in {folder} (no {ENCODER_CONFIG}); train one with "
            "python -m lightning_moe fit --config configs/multimodal/audio_encoder.yaml"
        )
    config = json.loads(path.read_text())
    encoder = AudioEncoder(config["width"], config["tokens"])
    try:
        encoder.load_state_dict(read_safetensors(Path(folder) / ENCODER_WEIGHTS))
    except RuntimeError as error:  # torch's message for missing or misshapen tensors
        raise AdapterCheckpointError(f"{folder}: the weights do not fit {ENCODER_CONFIG}: {error}") from None
    return encoder.requires_grad_(False).eval()


class SpokenDigitTask(TaskModule):
    """Stage 0: trains the audio encoder as a spoken-digit classifier (`SpokenDigitDataModule`);
    validation and test report `<stage>/accuracy` on the held-out voices. The export is the
    encoder alone (the head is only the training signal).

    Args:
        width: Channels of the encoder, and the width of each audio token.
        tokens: Audio tokens per utterance.
        model_seed: Seed of the initialisation.
        **kwargs: Optimisation settings of `TaskModule`.
    """

    def __init__(self, width: int = 128, tokens: int = 8, model_seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.width = width
        self.tokens = tokens
        self.model_seed = model_seed
        self.accuracy = MulticlassAccuracy(num_classes=len(DIGIT_WORDS), average="micro")

    def build_model(self) -> nn.Module:
        return SpokenDigitClassifier(self.width, self.tokens, self.model_seed)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"model": self.model} if self.model is not None else {}

    def export(self, folder: str, base_model: str = "", overwrite: bool = False) -> None:
        if self.global_rank == 0:
            save_audio_encoder(self.model.encoder, folder, overwrite)

    def task_loss(self, batch: dict) -> tuple[Tensor, Tensor | None]:
        logits = self.model(batch["features"])
        if not self.training:
            self.accuracy.update(logits.argmax(-1), batch["digit"])
        return F.cross_entropy(logits, batch["digit"]), None

    def _log_accuracy(self, stage: str) -> None:
        self.log(f"{stage}/accuracy", self.accuracy.compute())
        self.accuracy.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_accuracy("val")

    def on_test_epoch_end(self) -> None:
        self._log_accuracy("test")

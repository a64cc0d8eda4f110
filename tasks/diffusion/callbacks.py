"""The diffusion domain's callback: generated images written as a PNG grid and to TensorBoard."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torchvision.utils import make_grid, save_image

from lightning_moe.callbacks import JsonlPredictionWriter
from lightning_moe.errors import UserInputError
from lightning_moe.tasks.diffusion.sample_grid import captioned_figure


class ImagePredictionWriter(JsonlPredictionWriter):
    """For predictions that carry an "image" ([C, H, W] in [0, 1]): the images as one PNG grid
    next to the jsonl file (same name, .png) and in TensorBoard; the rest of each record as jsonl.

    Args:
        path: The jsonl file; default: "predictions.jsonl" in the run's log directory. Neither
            it nor the PNG is ever overwritten.
        nrow: Images per grid row.
    """

    def __init__(self, path: str | None = None, nrow: int = 10) -> None:
        super().__init__(path)
        self.nrow = nrow

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        grid = self._target(trainer).with_suffix(".png")
        if stage == "predict" and grid.exists():
            raise UserInputError(f"image grid {grid} exists; choose another path")

    def write_on_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Sequence[Any], batch_indices
    ) -> None:
        records = [dict(record) for batch in predictions for record in batch]
        images = [record.pop("image") for record in records]
        target = self._target(trainer).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        save_image(make_grid(images, nrow=self.nrow, pad_value=0.5), target)
        if isinstance(trainer.logger, TensorBoardLogger):  # there each image under its prompt
            prompts = [record.get("prompt", "") for record in records]
            figure = captioned_figure(torch.stack(images), prompts, columns=self.nrow)
            trainer.logger.experiment.add_figure("predictions", figure, trainer.global_step)
        self.write_records(trainer, records)

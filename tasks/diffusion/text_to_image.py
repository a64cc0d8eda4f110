"""Text-to-image diffusion: train a small base UNet, or concept/style LoRAs on a trained one.

`UNetTrainingTask` (the base stage) trains the whole UNet and exports it with
`save_pretrained`. `TextToImageTask` (the LoRA stage) loads that UNet (`unet_path`) and trains
adapters on its attention projections, exported both in our format and in the layout diffusers'
`load_lora_weights` reads. Both share the model, loss and sampling (`TextToImageDiffusion`).

`predict` samples the prompts of a `ConceptPromptDataModule` or a `CanvasPromptDataModule` with
several concept LoRAs composed (`composition` over a fixed-weight mixture; none for a trained
gate) and, given a concept judge, records per image whether each prompted concept shows
(presence.py).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
from torch import nn

from lightning_moe.adapters import export_diffusers_lora
from lightning_moe.module import AdapterModule
from lightning_moe.task import TaskModule
from lightning_moe.tasks.diffusion.compositions import Composition
from lightning_moe.tasks.diffusion.concept_judge import load_concept_judge
from lightning_moe.tasks.diffusion.denoising import TextToImageDiffusion
from lightning_moe.tasks.diffusion.presence import check_judge_knows, judged_records

UNET_FOLDER = "unet"


class UNetTrainingTask(TextToImageDiffusion, TaskModule):
    """The base stage: every weight of the UNet trains (the text encoder stays frozen); the
    export is the UNet folder (`<export>/unet`, `save_pretrained`) the LoRA stage's `unet_path`
    reads.

    Args:
        **kwargs: The model, loss and sampling settings of `TextToImageDiffusion`, and the
            optimisation settings of `TaskModule`.
    """

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"model.unet": self.model.unet} if self.model is not None else {}

    def export(self, folder: str, base_model: str = "", overwrite: bool = False) -> None:
        target = Path(folder) / UNET_FOLDER
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
        if self.global_rank == 0:
            self.model.unet.save_pretrained(target)


class TextToImageTask(TextToImageDiffusion, AdapterModule):
    """Adapters on a trained UNet: concept LoRAs, a gate over them, or their composition.

    Args:
        composition: How `predict` combines the LoRAs of a fixed-weight mixture (`Merge`,
            `Switch`, `Composite`, `CLoRA`, `LoRAComposer` from lightning_moe.tasks.diffusion;
            LoRAComposer reads each prompt's `layout` from the batch); None samples the model as is.
        judge_path: A trained concept judge folder; `predict` then records concept presence.
        data: The data module (linked by the CLI); a judge needs a `ConceptPromptDataModule` or
            a `CanvasPromptDataModule`, whose prompts say which concepts to expect.
        **kwargs: The model, loss and sampling settings of `TextToImageDiffusion`, and the adapter
            and optimisation settings of `AdapterModule`.
    """

    def __init__(
        self,
        composition: Composition | None = None,
        judge_path: str | None = None,
        data: L.LightningDataModule | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.composition = composition
        self.judge_path = judge_path
        self.data = data

    def export(self, folder: str, base_model: str = "", overwrite: bool = False) -> None:
        super().export(folder, base_model, overwrite)
        # diffusers loads plain LoRAs only; a gate over LoRAs stays in our format
        plain_lora = all(rule.config.kind == "lora" for rule in self.adapter_rules)
        if self.global_rank == 0 and plain_lora:
            export_diffusers_lora(self.model.unet, folder, overwrite=overwrite)

    # --- composed concepts --------------------------------------------------------------------
    def on_predict_start(self) -> None:
        judge = load_concept_judge(self.judge_path).to(self.device) if self.judge_path else None
        if judge is not None:
            check_judge_knows(judge, self.data, self.judge_path)
        # kept out of the module tree: the judge is neither part of the model nor of its checkpoints
        self.__dict__["concept_judge"] = judge

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """One record per prompt: the image, its sampling cost and, with a judge, which concepts show."""
        start = time.perf_counter()
        images = self.sample(batch["prompt"], self.composition, seed=batch_idx, layouts=batch.get("layout"))
        seconds = (time.perf_counter() - start) / len(images)
        records = [
            {"prompt": prompt, "image": image.cpu(), "seconds_per_image": seconds}
            for prompt, image in zip(batch["prompt"], images, strict=True)
        ]
        if self.concept_judge is not None:
            for record, judged in zip(
                records, judged_records(self.concept_judge, images * 2 - 1, batch), strict=True
            ):
                record |= judged
        return records

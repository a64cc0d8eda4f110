"""Text-to-image diffusion: train a small base UNet, or concept/style LoRAs on a trained one.

`UNetTrainingTask` (the base stage) trains the whole UNet and exports it with
`save_pretrained`. `TextToImageTask` (the LoRA stage) loads that UNet (`unet_path`) and trains
adapters on its attention projections, exported both in our format and in the layout diffusers'
`load_lora_weights` reads. Both share the model, loss and sampling (`TextToImageDiffusion`).

`predict` samples the prompts of a `ConceptPromptDataModule` with several concept LoRAs composed
(`composition`: merge, switch or composite over a fixed-weight mixture; none for a trained gate)
and, given a concept judge, records per image whether each prompted concept shows.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
from torch import Tensor, nn

from lightning_moe.adapters import export_diffusers_lora
from lightning_moe.data.concept_prompts import ConceptPromptDataModule
from lightning_moe.errors import UserInputError
from lightning_moe.module import AdapterModule
from lightning_moe.task import TaskModule
from lightning_moe.tasks.diffusion.compositions import Composition
from lightning_moe.tasks.diffusion.concept_judge import ConceptJudge, load_concept_judge
from lightning_moe.tasks.diffusion.denoising import TextToImageDiffusion

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
        data: The data module (linked by the CLI); a judge needs a `ConceptPromptDataModule`,
            whose prompts say which concepts to expect.
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
            prompts = self.data.prompts if isinstance(self.data, ConceptPromptDataModule) else None
            check_judge_knows(judge, prompts, self.judge_path)
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
            verdicts = self.concept_judge.judge(images * 2 - 1)
            for row, record in enumerate(records):
                record |= concept_presence(
                    self.concept_judge, verdicts, row, batch["object"][row], batch["styles"][row]
                )
        return records


def check_judge_knows(judge: ConceptJudge, prompts, path: str) -> None:
    """Every object and style the prompts name must be one the judge can see."""
    if prompts is None:
        raise UserInputError(
            "judging concepts needs prompts that say which concepts to expect: use "
            "lightning_moe.data.concept_prompts.ConceptPromptDataModule, or judge_path: null"
        )
    known = set(judge.object_names + judge.style_names)
    for item in prompts:
        unknown = [concept for concept in [item["object"], *item["styles"]] if concept not in known]
        if unknown:
            raise UserInputError(
                f"the concept judge in {path} cannot judge {unknown[0]!r}; it knows the objects "
                f"{judge.object_names} and the styles {judge.style_names}"
            )


def concept_presence(
    judge: ConceptJudge,
    verdicts: dict[str, Tensor],
    row: int,
    expected_object: str,
    expected_styles: list[str],
) -> dict[str, Any]:
    """What the judge saw on image `row`, and whether each prompted concept is there."""
    seen_object = judge.object_names[int(verdicts["object"][row])]
    seen_styles = [name for name in judge.style_names if verdicts[name][row]]
    found = {"object_present": seen_object == expected_object} | {
        f"{style}_present": style in seen_styles for style in expected_styles
    }
    unprompted = [style for style in seen_styles if style not in expected_styles]
    judged = {"judged_object": seen_object, "judged_styles": seen_styles}
    return judged | found | {"all_present": all(found.values()), "unprompted_style": bool(unprompted)}

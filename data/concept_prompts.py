"""Prompts for sampling composed concept LoRAs, each with the concepts a judge should find.

A prompt names an object and styles exactly as the training captions do ("a handwritten digit
3, inverted, framed"), so each concept LoRA meets the words it was trained on. Every class of the
source gets `samples_per_prompt` prompts; the batches are fixed, so the same prompt index gets the
same starting noise under every composition method.
"""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader, Dataset

from lightning_moe.data.captioned_images import (
    caption,
    checked_source_and_styles,
    object_names,
    source_class_names,
)


class ConceptPrompts(Dataset):
    """{"prompt", "object" (the judge's name for it), "styles"} per item."""

    def __init__(
        self, source: str, class_names: list[str], styles: list[str], samples_per_prompt: int
    ) -> None:
        judged = object_names(source, class_names)
        self.items = [
            {
                "prompt": caption(source, name, styles),
                "object": judged[0] if len(judged) == 1 else judged[label],
                "styles": list(styles),
            }
            for label, name in enumerate(class_names)
            for _ in range(samples_per_prompt)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def collate_prompts(items: list[dict]) -> dict[str, list]:
    return {key: [item[key] for item in items] for key in items[0]}


class ConceptPromptDataModule(L.LightningDataModule):
    """Prompts over every class of a source, all naming the same styles, for `predict`.

    Args:
        source: Whose class names make the objects: "fashion-mnist", "mnist-5k" or "digits".
        styles: Styles every prompt names ("inverted", "framed"), in caption order.
        samples_per_prompt: Images per class (each with its own starting noise).
        batch_size: Prompts sampled together.
        fashion_root: A folder with Fashion-MNIST's IDX files (default: fetched into the cache).
    """

    def __init__(
        self,
        source: str = "mnist-5k",
        styles: list[str] | None = None,
        samples_per_prompt: int = 4,
        batch_size: int = 20,
        fashion_root: str | None = None,
    ) -> None:
        super().__init__()
        self.source, self.styles = checked_source_and_styles(source, styles)
        self.samples_per_prompt = samples_per_prompt
        self.batch_size = batch_size
        self.fashion_root = fashion_root
        self.prompts: ConceptPrompts | None = None

    def setup(self, stage: str) -> None:
        if self.prompts is None:
            class_names = source_class_names(self.source, self.fashion_root)
            self.prompts = ConceptPrompts(self.source, class_names, self.styles, self.samples_per_prompt)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.prompts, batch_size=self.batch_size, collate_fn=collate_prompts)

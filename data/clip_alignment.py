"""Captioned images for aligning a composed CLIP (the LiT stage), from the alignment pools of the
packaged domains: images no stream trains or tests on. Each image's caption is one of its
domain's templates (chosen per image, fixed by `seed`) filled with its class's prompt name:
"a grayscale photo of a sneaker.". No real caption corpus ships in a package; these captions are
generated from labels.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from torch.utils.data import ConcatDataset, Dataset

from lightning_moe.data.captioned_images import ImageSplits
from lightning_moe.data.continual_streams import StreamImages, StreamTask, alignment_pool, select_images
from lightning_moe.data.splits import require_training_examples


class CaptionedPool(Dataset):
    """Pool images with generated captions, plus (source index, label) for zero-shot checks and
    a `key` per image. `positions` are the images' places in the whole pool."""

    def __init__(
        self, task: StreamTask, source_index: int, image_size: int, seed: int, positions: np.ndarray
    ) -> None:
        self.images = StreamImages(task, "train", image_size)
        labels = [self.images.label_of[int(label)] for label in self.images.images.labels]
        templates = np.random.default_rng([seed, source_index]).integers(0, len(task.templates), len(labels))
        self.captions = [
            task.templates[template].format(task.class_names[label])
            for template, label in zip(templates.tolist(), labels, strict=True)
        ]
        self.source_index = source_index
        # a stable id per image (source, position in its pool), so frozen features can be cached
        self.keys = [source_index * 10_000_000 + int(position) for position in positions]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        item = self.images[index] | {"caption": self.captions[index], "source": self.source_index}
        return item | {"key": self.keys[index]}


class AlignmentDataModule(ImageSplits):
    """Captioned alignment-pool images of several packaged domains; training and validation take
    disjoint fixed subsets of each pool.

    Args:
        sources: Packaged domains ("mnist-5k", "digits", "fashion-mnist", "textile").
        image_size: Side of the square RGB images.
        train_size: Training images per source.
        val_size: Validation images per source (zero-shot accuracy is measured on them).
        batch_size: Images per batch.
        seed: Seed of the subsets, the caption templates and the shuffling.
        fashion_root: A folder with Fashion-MNIST's IDX files (default: fetched into the cache).
    """

    def __init__(
        self,
        sources: list[str] | None = None,
        image_size: int = 128,
        train_size: int = 2000,
        val_size: int = 200,
        batch_size: int = 64,
        seed: int = 0,
        fashion_root: str | None = None,
    ) -> None:
        super().__init__()
        self.sources = list(sources or ["mnist-5k", "digits", "fashion-mnist", "textile"])
        self.tasks = [alignment_pool(source, fashion_root) for source in self.sources]
        self.image_size = image_size
        self.sizes = {"train": train_size, "val": val_size}
        self.batch_size = batch_size
        self.seed = seed
        self.splits: dict[str, ConcatDataset] = {}

    def setup(self, stage: str) -> None:
        if self.splits:
            return
        parts: dict[str, list[CaptionedPool]] = {"train": [], "val": []}
        for index, task in enumerate(self.tasks):
            order = np.random.default_rng([self.seed, index]).permutation(len(task.train))
            # validation first, so a pool smaller than train_size + val_size still has one
            val, train = order[: self.sizes["val"]], order[self.sizes["val"] :][: self.sizes["train"]]
            for split, chosen in (("train", train), ("val", val)):
                subset = dataclasses.replace(task, train=select_images(task.train, np.sort(chosen)))
                parts[split].append(CaptionedPool(subset, index, self.image_size, self.seed, np.sort(chosen)))
        self.splits = {split: ConcatDataset(pools) for split, pools in parts.items()}
        if stage == "fit":
            require_training_examples(self.splits["train"], self)

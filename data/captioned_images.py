"""Captioned images for text-to-image training, built from the packaged labelled datasets.

Each image gets the caption "a <class name>", and every style the data module applies is both
drawn on the image and named in the caption: "a sneaker, inverted, framed". Styles are checkable
by eye and by a classifier, which is how composed concept LoRAs are judged:

- `inverted`: dark strokes on a light ground (1 - x);
- `framed`: a mid-grey border FRAME_WIDTH pixels wide. Grey shows on a dark ground and on an
  inverted, light one alike, and inverting it leaves it grey, so the two styles commute.

Images are grayscale, resized to `image_size`, and scaled to [-1, 1] as the UNet sees them.
Splits are fixed: Fashion-MNIST has its own test split; MNIST-5k and the sklearn digits keep
every fifth image for validation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import ConcatDataset, DataLoader

from lightning_moe.data.image_sources import (
    DIGIT_CLASSES,
    FASHION_CLASSES,
    TEXTILE_CLASSES,
    ImageSet,
    fashion_mnist,
    mnist_5k,
    sklearn_digits,
    textile_images,
)
from lightning_moe.data.sampling import resumed_training_sampler
from lightning_moe.data.splits import require_training_examples
from lightning_moe.errors import UserInputError

FRAME_WIDTH = 2


def invert(images: torch.Tensor) -> torch.Tensor:
    return -images


def frame(images: torch.Tensor) -> torch.Tensor:
    framed = images.clone()
    framed[..., :FRAME_WIDTH, :] = framed[..., -FRAME_WIDTH:, :] = 0.0
    framed[..., :, :FRAME_WIDTH] = framed[..., :, -FRAME_WIDTH:] = 0.0
    return framed


STYLES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"inverted": invert, "framed": frame}
CAPTION_NAMES = {
    "mnist-5k": "handwritten digit {}",
    "digits": "handwritten digit {}",
    "textile": "textile swatch",
}
# the sources whose classes are one object to a judge (any digit is "handwritten digit")
SINGLE_OBJECTS = {"mnist-5k": "handwritten digit", "digits": "handwritten digit", "textile": "textile swatch"}
SOURCES = ["fashion-mnist", "mnist-5k", "digits", "textile"]
STORED_SIDE = 64  # textile photos (250 px JPGs) are decoded once at this side


def _split(source: str, fashion_root: str | None) -> dict[str, ImageSet]:
    if source == "fashion-mnist":
        return {"train": fashion_mnist("train", fashion_root), "val": fashion_mnist("test", fashion_root)}
    images = {"mnist-5k": mnist_5k, "digits": sklearn_digits, "textile": textile_pixels}[source]()
    held_out = np.arange(len(images)) % 5 == 0
    return {
        split: ImageSet(images.name, images.class_names, images.labels[keep], pixels=images.pixels[keep])
        for split, keep in (("train", ~held_out), ("val", held_out))
    }


def textile_pixels() -> ImageSet:
    """The textile photos as grayscale pixels, like the other sources."""
    photos = textile_images()
    pixels = np.stack(
        [
            np.asarray(photos.image(i).convert("L").resize((STORED_SIDE, STORED_SIDE)))
            for i in range(len(photos))
        ]
    )
    return ImageSet(photos.name, photos.class_names, photos.labels, pixels=pixels)


def split_pixels(
    source: str, split: str, image_size: int, fashion_root: str | None = None
) -> tuple[ImageSet, torch.Tensor]:
    """One split of a source and its images as [N, 1, size, size] in [-1, 1]."""
    images = _split(source, fashion_root)[split]
    return images, _pixels(images, image_size)


def source_class_names(source: str, fashion_root: str | None = None) -> list[str]:
    return _split(source, fashion_root)["train"].class_names


def _pixels(images: ImageSet, image_size: int) -> torch.Tensor:
    """uint8 [N, H, W] -> [N, 1, size, size] in [-1, 1]."""
    pixels = torch.from_numpy(images.pixels).float().div(255).unsqueeze(1)
    pixels = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear", antialias=True)
    return pixels.clamp(0, 1) * 2 - 1


def caption(source: str, class_name: str, styles: list[str]) -> str:
    """The caption of an image of `class_name` from `source` drawn with `styles`."""
    return f"a {CAPTION_NAMES.get(source, '{}').format(class_name)}" + "".join(
        f", {style}" for style in styles
    )


def object_names(source: str, class_names: list[str]) -> list[str]:
    """What a judge calls the objects of a source: each Fashion-MNIST class, or one name for a
    digit set ("handwritten digit": the digit concept is any digit) or the textile photos."""
    return [SINGLE_OBJECTS[source]] if source in SINGLE_OBJECTS else list(class_names)


SOURCE_CLASSES = {
    "fashion-mnist": FASHION_CLASSES,
    "mnist-5k": DIGIT_CLASSES,
    "digits": DIGIT_CLASSES,
    "textile": TEXTILE_CLASSES,
}


def judged_objects(sources: list[str]) -> list[str]:
    """The objects a judge of these sources tells apart, in order; sources that name an object
    alike (the two digit sets) share it."""
    return list(
        dict.fromkeys(name for source in sources for name in object_names(source, SOURCE_CLASSES[source]))
    )


def judged_styles(styles: list[str] | None) -> list[str]:
    """The styles a judge looks for: the given ones, or every known style."""
    return list(styles if styles is not None else STYLES)


class CaptionedImages(torch.utils.data.Dataset):
    """(image [1, size, size] in [-1, 1], caption, label) with the styles applied."""

    def __init__(self, images: ImageSet, image_size: int, styles: list[str], source: str) -> None:
        self.images = _pixels(images, image_size)
        for style in styles:
            self.images = STYLES[style](self.images)
        self.labels = torch.from_numpy(images.labels)
        self.captions = [caption(source, name, styles) for name in images.class_names]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        label = int(self.labels[index])
        return {"image": self.images[index], "caption": self.captions[label], "label": label}


def checked_source_and_styles(source: str, styles: list[str] | None) -> tuple[str, list[str]]:
    """The source and styles of a data module, after checking that both are known."""
    if source not in SOURCES:
        raise UserInputError(f"source must be one of {SOURCES}, got {source!r}")
    unknown = [style for style in styles or [] if style not in STYLES]
    if unknown:
        raise UserInputError(f"unknown style {unknown[0]!r}; known styles: {sorted(STYLES)}")
    return source, list(styles or [])


def _subset(images: ImageSet, size: int | None, generator: np.random.Generator) -> ImageSet:
    if size is None or size >= len(images):
        return images
    keep = np.sort(generator.choice(len(images), size, replace=False))
    return ImageSet(images.name, images.class_names, images.labels[keep], pixels=images.pixels[keep])


class ImageSplits(L.LightningDataModule):
    """Loaders over `self.splits` ("train" shuffled resumably, "val" in order)."""

    splits: dict[str, torch.utils.data.Dataset]
    seed: int
    batch_size: int

    def train_dataloader(self) -> DataLoader:
        examples = self.splits["train"]
        sampler = resumed_training_sampler(self, len(examples), self.seed, self.batch_size)
        return DataLoader(examples, batch_size=self.batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["val"], batch_size=self.batch_size)


class CaptionedImageDataModule(ImageSplits):
    """Captioned grayscale images from a packaged dataset, with optional styles.

    Args:
        source: "fashion-mnist", "mnist-5k" or "digits".
        styles: Styles drawn on every image and named in its caption ("inverted", "framed").
        image_size: Side of the square images (the UNet's sample size).
        train_size: Use only this many training images (None: all).
        val_size: Use only this many validation images.
        batch_size: Images per batch.
        seed: Seed of the shuffling and of the subsets.
        fashion_root: A folder with Fashion-MNIST's IDX files (default: fetched into the cache).
    """

    def __init__(
        self,
        source: str = "fashion-mnist",
        styles: list[str] | None = None,
        image_size: int = 32,
        train_size: int | None = None,
        val_size: int = 256,
        batch_size: int = 64,
        seed: int = 0,
        fashion_root: str | None = None,
    ) -> None:
        super().__init__()
        self.source, self.styles = checked_source_and_styles(source, styles)
        self.image_size = image_size
        self.train_size = train_size
        self.val_size = val_size
        self.batch_size = batch_size
        self.seed = seed
        self.fashion_root = fashion_root
        self.splits: dict[str, CaptionedImages] = {}

    def setup(self, stage: str) -> None:
        if self.splits:
            return
        generator = np.random.default_rng(self.seed)
        sizes = {"train": self.train_size, "val": self.val_size}
        for split, images in _split(self.source, self.fashion_root).items():
            images = _subset(images, sizes[split], generator)
            self.splits[split] = CaptionedImages(images, self.image_size, self.styles, self.source)
        if stage == "fit":
            require_training_examples(self.splits["train"], self)


class CaptionedImageMix(ImageSplits):
    """Several captioned image sets as one, e.g. the training sets of several concept LoRAs, on
    which a gate over those LoRAs learns when to use which.

    Args:
        parts: One dict per set with `CaptionedImageDataModule` arguments (source, styles,
            train_size, val_size).
        image_size: Side of the square images, for every part.
        batch_size: Images per batch.
        seed: Seed of the shuffling and of each part's subsets.
        fashion_root: A folder with Fashion-MNIST's IDX files (default: fetched into the cache).
    """

    def __init__(
        self,
        parts: list[dict[str, Any]],
        image_size: int = 32,
        batch_size: int = 64,
        seed: int = 0,
        fashion_root: str | None = None,
    ) -> None:
        super().__init__()
        if not parts:
            raise UserInputError("CaptionedImageMix needs at least one part, got parts=[]")
        allowed = {"source", "styles", "train_size", "val_size"}
        for part in parts:
            if not set(part) <= allowed:
                raise UserInputError(
                    f"unknown keys {sorted(set(part) - allowed)} in part {part}; a part takes {sorted(allowed)}"
                )
        self.parts = [
            CaptionedImageDataModule(**part, image_size=image_size, seed=seed, fashion_root=fashion_root)
            for part in parts
        ]
        self.batch_size = batch_size
        self.seed = seed
        self.splits: dict[str, ConcatDataset] = {}

    def setup(self, stage: str) -> None:
        if self.splits:
            return
        for part in self.parts:
            part.setup(stage)
        self.splits = {
            split: ConcatDataset([part.splits[split] for part in self.parts]) for split in ("train", "val")
        }


class StyledImages(torch.utils.data.Dataset):
    """Images of several sources, each style drawn with probability 1/2 (fixed per image by
    `seed`): (image, object label, one 0/1 flag per style), for training concept judges."""

    def __init__(
        self, sets: list[tuple[str, ImageSet]], image_size: int, styles: list[str], seed: int
    ) -> None:
        self.object_names = judged_objects([source for source, _ in sets])
        images, objects = [], []
        for source, image_set in sets:
            names = object_names(source, image_set.class_names)
            index = torch.tensor([self.object_names.index(name) for name in names])
            labels = (
                torch.from_numpy(image_set.labels)
                if len(names) > 1
                else torch.zeros(len(image_set), dtype=torch.long)
            )
            images.append(_pixels(image_set, image_size))
            objects.append(index[labels])
        self.images, self.objects = torch.cat(images), torch.cat(objects)
        generator = torch.Generator().manual_seed(seed)
        self.flags = torch.randint(0, 2, (len(self.objects), len(styles)), generator=generator)
        for column, style in enumerate(styles):
            chosen = self.flags[:, column].bool()
            self.images[chosen] = STYLES[style](self.images[chosen])

    def __len__(self) -> int:
        return len(self.objects)

    def __getitem__(self, index: int) -> dict:
        return {
            "image": self.images[index],
            "object": self.objects[index],
            "styles": self.flags[index].float(),
        }


class StyledImageDataModule(ImageSplits):
    """Images from several packaged sources with random styles, for the concept judges.

    Args:
        sources: Datasets to mix ("fashion-mnist", "mnist-5k", "digits").
        styles: Styles each drawn on half of the images ("inverted", "framed").
        image_size: Side of the square images.
        train_size: Training images per source (None: all).
        val_size: Validation images per source.
        batch_size: Images per batch.
        seed: Seed of the subsets, the styles and the shuffling.
        fashion_root: A folder with Fashion-MNIST's IDX files (default: fetched into the cache).
    """

    def __init__(
        self,
        sources: list[str] | None = None,
        styles: list[str] | None = None,
        image_size: int = 32,
        train_size: int | None = 10000,
        val_size: int = 1000,
        batch_size: int = 128,
        seed: int = 0,
        fashion_root: str | None = None,
    ) -> None:
        super().__init__()
        self.sources = list(sources or ["fashion-mnist", "mnist-5k"])
        self.styles = judged_styles(styles)
        for source in self.sources:
            checked_source_and_styles(source, self.styles)
        self.image_size = image_size
        self.sizes = {"train": train_size, "val": val_size}
        self.batch_size = batch_size
        self.seed = seed
        self.fashion_root = fashion_root
        self.splits: dict[str, StyledImages] = {}

    def setup(self, stage: str) -> None:
        if self.splits:
            return
        generator = np.random.default_rng(self.seed)
        per_split: dict[str, list] = {"train": [], "val": []}
        for source in self.sources:
            for split, images in _split(source, self.fashion_root).items():
                per_split[split].append((source, _subset(images, self.sizes[split], generator)))
        for offset, (split, sets) in enumerate(per_split.items()):
            self.splits[split] = StyledImages(sets, self.image_size, self.styles, self.seed + offset)
        if stage == "fit":
            require_training_examples(self.splits["train"], self)

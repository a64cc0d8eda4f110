"""Two-object canvases for concept composition: a strip of two square slots, left and right,
each holding one object from the packaged image sets, with a caption that names each object and
its place: "a sneaker on the left and a handwritten digit on the right, framed".

Every concept has a region a judge can look at on its own: an object concept its slot, the
`framed` style the canvas border (a mid-grey ring FRAME_WIDTH pixels wide, see
captioned_images.py). Canvases are drawn on the fly from a per-index seed, so a split is a fixed
set of `size` canvases without storing them.

`CanvasDataModule` trains the composition base (objects from `source` in both slots) and each
concept LoRA (`concept_source` in one random slot, or a style on every canvas).
`CanvasPromptDataModule` gives the prompt sets that composition is judged on, with the layout
(the region of each concept) that layout-aware compositions read.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_moe.data.captioned_images import (
    FRAME_WIDTH,
    ImageSplits,
    frame,
    object_names,
    split_pixels,
)
from lightning_moe.data.concept_prompts import collate_prompts
from lightning_moe.data.splits import require_training_examples
from lightning_moe.errors import UserInputError

SLOTS = ("left", "right")
REGIONS = (*SLOTS, "border")
CANVAS_STYLES = ("framed",)


def article(name: str) -> str:
    return f"an {name}" if name[0].lower() in "aeiou" else f"a {name}"


def canvas_caption(slots: dict[str, str], styles: list[str]) -> str:
    """{"left": "sneaker", "right": "handwritten digit"}, ["framed"] ->
    "a sneaker on the left and a handwritten digit on the right, framed"; an empty slot is left out."""
    parts = [f"{article(name)} on the {slot}" for slot, name in slots.items() if name]
    return " and ".join(parts) + "".join(f", {style}" for style in styles)


def region_mask(region: str, height: int, width: int) -> torch.Tensor:
    """A 0/1 mask [height, width] of a canvas region at any resolution (the border ring is
    FRAME_WIDTH canvas pixels wide, at least one pixel at low resolution)."""
    mask = torch.zeros(height, width)
    if region == "left":
        mask[:, : width // 2] = 1
    elif region == "right":
        mask[:, width // 2 :] = 1
    elif region == "border":
        ring = max(1, round(FRAME_WIDTH * height / 24))
        mask[:ring], mask[-ring:], mask[:, :ring], mask[:, -ring:] = 1, 1, 1, 1
    else:
        raise UserInputError(f"unknown canvas region {region!r}; known regions: {list(REGIONS)}")
    return mask


def slot_crops(canvases: torch.Tensor) -> dict[str, torch.Tensor]:
    """[B, C, size, 2 * size] -> each slot's square crop [B, C, size, size]."""
    size = canvases.shape[-2]
    return {"left": canvases[..., :size], "right": canvases[..., size : 2 * size]}


def shows_frame(canvases: torch.Tensor, tolerance: float = 0.35) -> torch.Tensor:
    """Per canvas (pixels in [-1, 1]): whether the border ring of each slot is the frame's
    mid-grey (0) on average within `tolerance`. A plain canvas has a black (-1) ground at its
    border. Each slot's part of the ring is checked on its own because a textile swatch is grey
    too: one in a slot greys that slot's part of the ring, never the other's."""
    height, width = canvases.shape[-2:]
    ring = region_mask("border", height, width).bool()
    shown = []
    for slot in SLOTS:
        border = canvases[..., ring & region_mask(slot, height, width).bool()].flatten(1)
        shown.append((border.mean(-1).abs() < tolerance) & (border.std(-1) < 2 * tolerance))
    return torch.stack(shown).all(0)


class ObjectTiles:
    """One source's images as square tiles in [-1, 1], with the name a caption and a judge
    give each (a Fashion-MNIST class, or one name for a digit or textile set)."""

    def __init__(self, source: str, split: str, size: int, fashion_root: str | None) -> None:
        images, self.pixels = split_pixels(source, split, size, fashion_root)
        names = object_names(source, images.class_names)
        labels = images.labels if len(names) > 1 else np.zeros(len(images), dtype=np.int64)
        self.names = [names[label] for label in labels]

    def __len__(self) -> int:
        return len(self.names)


class Canvases(Dataset):
    """`size` canvases [1, tile, 2 * tile] with captions, canvas i drawn from seed (seed, i).

    Each canvas holds a `concept` tile in one random slot and a `base` tile in the other (with
    no concept: base tiles in both, one slot left empty at `single_object_rate`), and the styles.
    """

    def __init__(
        self,
        base: ObjectTiles,
        concept: ObjectTiles | None,
        styles: list[str],
        size: int,
        single_object_rate: float,
        seed: int,
    ) -> None:
        self.base, self.concept, self.styles = base, concept, list(styles)
        self.size, self.single_object_rate, self.seed = size, single_object_rate, seed

    def __len__(self) -> int:
        return self.size

    def layout(self, index: int) -> dict[str, tuple[ObjectTiles, int] | None]:
        """Which tile (set, row) goes into each slot of canvas `index`."""
        generator = np.random.default_rng([self.seed, index])
        sets = [self.base, self.base] if self.concept is None else [self.concept, self.base]
        if self.concept is not None and generator.random() < 0.5:
            sets.reverse()
        chosen = {
            slot: (tiles, int(generator.integers(len(tiles))))
            for slot, tiles in zip(SLOTS, sets, strict=True)
        }
        if self.concept is None and generator.random() < self.single_object_rate:
            chosen[SLOTS[int(generator.integers(2))]] = None
        return chosen

    def __getitem__(self, index: int) -> dict:
        slots = self.layout(index)
        tile = self.base.pixels.shape[-1]
        canvas = torch.full((1, tile, 2 * tile), -1.0)
        names = {}
        for column, slot in enumerate(SLOTS):
            names[slot] = ""
            if slots[slot] is not None:
                tiles, row = slots[slot]
                canvas[..., column * tile : (column + 1) * tile] = tiles.pixels[row]
                names[slot] = tiles.names[row]
        if "framed" in self.styles:
            canvas = frame(canvas)
        return {"image": canvas, "caption": canvas_caption(names, self.styles)}


def checked_canvas_styles(styles: list[str] | None) -> list[str]:
    unknown = [style for style in styles or [] if style not in CANVAS_STYLES]
    if unknown:
        raise UserInputError(f"unknown canvas style {unknown[0]!r}; canvas styles: {list(CANVAS_STYLES)}")
    return list(styles or [])


class CanvasDataModule(ImageSplits):
    """Captioned two-slot canvases, for the composition base and for concept LoRAs.

    Args:
        source: The objects of every slot (the base's objects): "fashion-mnist", "mnist-5k",
            "digits" or "textile".
        concept_source: If given, every canvas holds one object of this source in a random slot
            (an object concept LoRA's data); the other slot holds a `source` object.
        styles: Canvas styles drawn on every canvas and named in its caption ("framed").
        image_size: Side of a slot; canvases are image_size x 2 * image_size.
        train_size: Training canvases per epoch.
        val_size: Validation canvases.
        single_object_rate: Without a concept: the share of canvases with one slot left empty,
            so the base also learns captions that name one object.
        batch_size: Canvases per batch.
        seed: Seed of the canvases and of the shuffling.
        fashion_root: A folder with Fashion-MNIST's IDX files (default: fetched into the cache).
    """

    def __init__(
        self,
        source: str = "fashion-mnist",
        concept_source: str | None = None,
        styles: list[str] | None = None,
        image_size: int = 24,
        train_size: int = 20000,
        val_size: int = 256,
        single_object_rate: float = 0.2,
        batch_size: int = 32,
        seed: int = 0,
        fashion_root: str | None = None,
    ) -> None:
        super().__init__()
        self.source, self.concept_source = source, concept_source
        self.styles = checked_canvas_styles(styles)
        self.image_size = image_size
        self.sizes = {"train": train_size, "val": val_size}
        self.single_object_rate = single_object_rate
        self.batch_size = batch_size
        self.seed = seed
        self.fashion_root = fashion_root
        self.splits: dict[str, Canvases] = {}

    def setup(self, stage: str) -> None:
        if self.splits:
            return
        for offset, split in enumerate(("train", "val")):
            base = ObjectTiles(self.source, split, self.image_size, self.fashion_root)
            concept = None
            if self.concept_source is not None:
                concept = ObjectTiles(self.concept_source, split, self.image_size, self.fashion_root)
            self.splits[split] = Canvases(
                base, concept, self.styles, self.sizes[split], self.single_object_rate, self.seed + offset
            )
        if stage == "fit":
            require_training_examples(self.splits["train"], self)


class CanvasPrompts(Dataset):
    """{"prompt", "slots" (the object expected in each slot), "styles", "layout" (each concept's
    words -> its region)} per item: the prompt sets of the composition tables."""

    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


class CanvasPromptDataModule(L.LightningDataModule):
    """Prompts that place the given concept objects (and a base object where a slot is free) on
    the canvas, both ways round, with the canvas styles, for `predict`.

    Args:
        objects: The concept objects to place, one per slot at most, in the words of their
            captions ("handwritten digit", "textile swatch").
        styles: Canvas styles every prompt names ("framed").
        fill_objects: Objects that take a slot no concept takes, in turn (the base's objects).
        samples_per_prompt: Images of each prompt (each with its own starting noise).
        batch_size: Prompts sampled together.
    """

    def __init__(
        self,
        objects: list[str],
        styles: list[str] | None = None,
        fill_objects: list[str] | None = None,
        samples: int = 40,
        batch_size: int = 20,
    ) -> None:
        super().__init__()
        if len(objects) > len(SLOTS) or not (objects or styles):
            raise UserInputError(
                f"a prompt set places at most {len(SLOTS)} objects and names at least one concept, "
                f"got objects={objects}, styles={styles}"
            )
        self.objects = list(objects)
        self.styles = checked_canvas_styles(styles)
        self.fill_objects = list(fill_objects or ["sneaker", "bag", "trouser", "ankle boot"])
        self.samples = samples
        self.batch_size = batch_size
        self.prompts: CanvasPrompts | None = None

    def layouts(self) -> list[dict[str, str]]:
        """Slot -> object of each prompt: the concept objects alternately in both orders, free
        slots filled with the fill objects in turn."""
        layouts = []
        for index in range(self.samples):
            fill = iter(self.fill_objects[(index // 2 + k) % len(self.fill_objects)] for k in range(2))
            order = self.objects if index % 2 == 0 else self.objects[::-1]
            names = list(order) + [next(fill) for _ in range(len(SLOTS) - len(order))]
            if len(order) == 1 and index % 2:
                names.reverse()  # a single concept object takes both slots in turn
            layouts.append(dict(zip(SLOTS, names, strict=True)))
        return layouts

    def setup(self, stage: str) -> None:
        if self.prompts is not None:
            return
        items = []
        for slots in self.layouts():
            layout = {name: slot for slot, name in slots.items() if name in self.objects}
            layout |= {style: "border" for style in self.styles}
            items.append(
                {
                    "prompt": canvas_caption(slots, self.styles),
                    "slots": slots,
                    "styles": list(self.styles),
                    "layout": layout,
                }
            )
        self.prompts = CanvasPrompts(items)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.prompts, batch_size=self.batch_size, collate_fn=collate_prompts)

"""Task streams for continual learning with CLIP.

A stream is a fixed sequence of classification tasks. Each task carries what a zero-shot CLIP
head needs, its class names as prompts say them and its prompt templates, plus fixed train and
test images (RGB in [0, 1], `image_size` square; the model normalises).

- `TaskIncrementalStream` (MTIL style): each task is one dataset, in the given order. The
  packaged domains are "mnist-5k", "digits", "fashion-mnist" and "textile"; a dict
  {name, root, templates} adds a dataset from an image-folder root with `train/<class>/*` and
  `test/<class>/*` (how the MTIL order I/II configs read the standard datasets).
- `ClassIncrementalStream`: one dataset's classes split into steps (a fixed class order); step i
  trains on its classes, and evaluation after step i covers every class seen so far.

Fixed splits of the packaged domains: MNIST-5k, digits and textile keep every fifth image
(index % 5 == 0) for testing; Fashion-MNIST tests on its own test split. The rest is halved by
position: even positions are the stream's training pool, odd ones the alignment pool from which
the packaged CLIP learns its projections (`alignment_pool`), so alignment never sees a stream
image. `train_size` and `test_size` then take fixed subsets (seeded by `seed`), the same for
every method and run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from lightning_moe.data.image_sources import ImageSet, fashion_mnist, mnist_5k, sklearn_digits, textile_images
from lightning_moe.data.sampling import resumed_training_sampler
from lightning_moe.data.splits import require_training_examples
from lightning_moe.errors import UserInputError


@dataclass
class Domain:
    """A packaged dataset as a stream task: its loader ((train, test) image sets), the class names
    prompts use (None: the dataset's own) and the prompt templates."""

    load: Callable[[str | None], tuple[ImageSet, ImageSet]]
    templates: list[str]
    prompt_names: list[str] | None = None


def _held_out(images: ImageSet) -> tuple[ImageSet, ImageSet]:
    test = np.arange(len(images)) % 5 == 0
    return tuple(select_images(images, np.flatnonzero(keep)) for keep in (~test, test))


def select_images(images: ImageSet, index: np.ndarray) -> ImageSet:
    return ImageSet(
        images.name,
        images.class_names,
        images.labels[index],
        pixels=None if images.pixels is None else images.pixels[index],
        files=None if images.files is None else [images.files[i] for i in index],
    )


DOMAINS: dict[str, Domain] = {
    "mnist-5k": Domain(
        lambda root: _held_out(mnist_5k()), ['a photo of the number "{}".', "a handwritten digit {}."]
    ),
    "digits": Domain(lambda root: _held_out(sklearn_digits()), ['a blurry photo of the number "{}".']),
    "fashion-mnist": Domain(
        lambda root: (fashion_mnist("train", root), fashion_mnist("test", root)),
        ["a photo of a {}.", "a grayscale photo of a {}."],
    ),
    "textile": Domain(
        lambda root: _held_out(textile_images()),
        ["a photo of {}.", "a close-up photo of {}."],
        ["flawless fabric", "fabric with a local defect", "fabric with a defect all over"],
    ),
}


def halves(images: ImageSet) -> tuple[ImageSet, ImageSet]:
    """(even positions: the stream's training pool, odd positions: the alignment pool)."""
    position = np.arange(len(images))
    return select_images(images, position[position % 2 == 0]), select_images(
        images, position[position % 2 == 1]
    )


def alignment_pool(name: str, fashion_root: str | None = None) -> StreamTask:
    """A packaged domain's alignment half (its test images and stream pool excluded), as a task
    whose `train` holds the images and whose class names and templates make the captions."""
    return packaged_task(name, fashion_root, pool=1)


def image_folder(root: str | Path, name: str) -> tuple[ImageSet, ImageSet]:
    """`root/train/<class>/*` and `root/test/<class>/*`; class names from the train folders."""
    root = Path(root)
    if not root.is_dir():
        raise UserInputError(f"dataset root {root} of task {name!r} does not exist")
    splits = {}
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise UserInputError(
                f"dataset root {root} of task {name!r} has no {split}/ folder of class folders"
            )
    class_names = sorted(folder.name for folder in (root / "train").iterdir() if folder.is_dir())
    for split in ("train", "test"):
        files, labels = [], []
        for label, class_name in enumerate(class_names):
            found = sorted(path for path in (root / split / class_name).glob("*") if path.is_file())
            files += found
            labels += [label] * len(found)
        splits[split] = ImageSet(name, class_names, np.array(labels, dtype=np.int64), files=files)
    return splits["train"], splits["test"]


@dataclass(eq=False)
class StreamTask:
    """One task: class names for prompts, templates, and its train/test images.

    `classes` are the labels of the underlying dataset the task covers (all of them in a
    task-incremental stream). Its images are labelled `label_offset + classes.index(label)`: a
    task-incremental task counts from 0, a class-incremental step continues after the classes
    of the steps before it, so labels index the class order of the whole stream."""

    name: str
    class_names: list[str]
    templates: list[str]
    train: ImageSet
    test: ImageSet
    classes: list[int] = field(default_factory=list)
    label_offset: int = 0


class StreamImages(Dataset):
    """{image [3, size, size] in [0, 1], label, key} of one task's split (see StreamTask for
    labels); the key "task/split/index" names the image within the stream (feature caches)."""

    def __init__(self, task: StreamTask, split: str, image_size: int) -> None:
        images = getattr(task, split)
        self.images = select_images(images, np.flatnonzero(np.isin(images.labels, task.classes)))
        self.label_of = {label: task.label_offset + index for index, label in enumerate(task.classes)}
        self.image_size = image_size
        self.key_prefix = f"{task.name}/{split}/"

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        image = self.images.image(index).convert("RGB").resize((self.image_size,) * 2, Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        label = self.label_of[int(self.images.labels[index])]
        return {"image": pixels, "label": label, "key": f"{self.key_prefix}{index}"}


def load_domain(spec: str | dict[str, Any], fashion_root: str | None) -> StreamTask:
    """A task from a packaged domain name or an image-folder dict {name, root, templates}."""
    if isinstance(spec, dict):
        unknown = set(spec) - {"name", "root", "templates"}
        if unknown or not {"name", "root"} <= set(spec):
            raise UserInputError(f"an image-folder task needs keys name and root (and templates), got {spec}")
        train, test = image_folder(spec["root"], spec["name"])
        templates = list(spec.get("templates") or ["a photo of a {}."])
        names = [name.replace("_", " ") for name in train.class_names]
        return StreamTask(spec["name"], names, templates, train, test, list(range(len(names))))
    return packaged_task(spec, fashion_root, pool=0)


def packaged_task(name: str, fashion_root: str | None, pool: int) -> StreamTask:
    """A packaged domain with its stream (pool 0) or alignment (pool 1) half as training images."""
    if name not in DOMAINS:
        raise UserInputError(
            f"unknown dataset {name!r} in the task order; packaged ones are {sorted(DOMAINS)}, or give "
            "{name, root, templates} for an image-folder dataset"
        )
    domain = DOMAINS[name]
    train, test = domain.load(fashion_root)
    names = domain.prompt_names or train.class_names
    return StreamTask(name, list(names), domain.templates, halves(train)[pool], test, list(range(len(names))))


class ContinualStream(L.LightningDataModule):
    """The shared part: fixed subsets, the current task's training loader, every task's test
    loader (the accuracy matrix needs all of them after each task).

    Training sees each task for `epochs_per_task` epochs, in order: epoch e trains task
    e // epochs_per_task, so a trainer with max_epochs = tasks x epochs_per_task that reloads
    its dataloaders every epoch walks the stream (a resumed run continues at its epoch's task)."""

    tasks: list[StreamTask]
    class_incremental = False

    def __init__(
        self,
        image_size: int,
        train_size: int | None,
        test_size: int | None,
        batch_size: int,
        seed: int,
        epochs_per_task: int,
    ):
        super().__init__()
        if epochs_per_task < 1:
            raise UserInputError(f"epochs_per_task must be >= 1, got {epochs_per_task}")
        self.image_size = image_size
        self.train_size = train_size
        self.test_size = test_size
        self.batch_size = batch_size
        self.seed = seed
        self.epochs_per_task = epochs_per_task
        self.current_task = 0

    def task_of_epoch(self, epoch: int) -> int:
        return epoch // self.epochs_per_task

    def subset(self, images: ImageSet, size: int | None, salt: int) -> ImageSet:
        if size is None or size >= len(images):
            return images
        generator = np.random.default_rng([self.seed, salt])
        return select_images(images, np.sort(generator.choice(len(images), size, replace=False)))

    def split(self, index: int, split: str) -> StreamImages:
        """Task `index`'s fixed train or test subset."""
        images = StreamImages(self.tasks[index], split, self.image_size)
        size = self.train_size if split == "train" else self.test_size
        images.images = self.subset(images.images, size, salt=2 * index + (split == "test"))
        return images

    def test_sizes(self) -> list[int]:
        return [len(self.split(index, "test")) for index in range(len(self.tasks))]

    def setup(self, stage: str) -> None:
        if stage == "fit":
            for index, task in enumerate(self.tasks):
                require_training_examples(self.split(index, "train"), self, f"task {task.name!r} has none")

    def train_dataloader(self) -> DataLoader:
        if self.trainer is not None:
            self.current_task = self.task_of_epoch(self.trainer.current_epoch)
        examples = self.split(self.current_task, "train")
        sampler = resumed_training_sampler(
            self, len(examples), self.seed + self.current_task, self.batch_size
        )
        return DataLoader(examples, batch_size=self.batch_size, sampler=sampler)

    def test_loader(self, index: int) -> DataLoader:
        return DataLoader(self.split(index, "test"), batch_size=self.batch_size)


class TaskIncrementalStream(ContinualStream):
    """Datasets one after another, each its own task with its own classes and templates.

    Args:
        tasks: The task order: packaged domain names ("mnist-5k", "digits", "fashion-mnist",
            "textile") or dicts {name, root, templates} of image-folder datasets.
        image_size: Side of the square RGB images.
        train_size: Training images per task (a fixed subset; None: all).
        test_size: Test images per task (a fixed subset; None: all).
        batch_size: Images per batch.
        seed: Seed of the subsets and the shuffling.
        fashion_root: A folder with Fashion-MNIST's IDX files (default: fetched into the cache).
        epochs_per_task: Training epochs of each task.
    """

    def __init__(
        self,
        tasks: list[str | dict[str, Any]],
        image_size: int = 224,
        train_size: int | None = 1000,
        test_size: int | None = 500,
        batch_size: int = 32,
        seed: int = 0,
        fashion_root: str | None = None,
        epochs_per_task: int = 1,
    ) -> None:
        super().__init__(image_size, train_size, test_size, batch_size, seed, epochs_per_task)
        if len(tasks) < 2:
            raise UserInputError(f"a stream needs at least two tasks, got {tasks}")
        self.tasks = [load_domain(spec, fashion_root) for spec in tasks]
        names = [task.name for task in self.tasks]
        if len(set(names)) != len(names):
            raise UserInputError(f"task names must be distinct, got {names}")


class ClassIncrementalStream(ContinualStream):
    """One dataset's classes learned in steps; after step i the test covers all classes so far.

    Args:
        dataset: A packaged domain name or an image-folder dict (see TaskIncrementalStream).
        class_splits: The classes of each step, by name, in order; together they must cover
            every class exactly once.
        image_size, train_size, test_size, batch_size, seed, fashion_root, epochs_per_task: As
            in TaskIncrementalStream (sizes are per step).
    """

    class_incremental = True

    def __init__(
        self,
        dataset: str | dict[str, Any],
        class_splits: list[list[str]],
        image_size: int = 224,
        train_size: int | None = 1000,
        test_size: int | None = 500,
        batch_size: int = 32,
        seed: int = 0,
        fashion_root: str | None = None,
        epochs_per_task: int = 1,
    ) -> None:
        super().__init__(image_size, train_size, test_size, batch_size, seed, epochs_per_task)
        whole = load_domain(dataset, fashion_root)
        check_class_splits(class_splits, whole.class_names)
        offsets = np.cumsum([0] + [len(names) for names in class_splits])
        self.tasks = [
            StreamTask(
                f"{whole.name}/step{step}",
                list(names),
                whole.templates,
                whole.train,
                whole.test,
                [whole.class_names.index(name) for name in names],
                int(offsets[step]),
            )
            for step, names in enumerate(class_splits)
        ]


def check_class_splits(class_splits: list[list[str]], class_names: list[str]) -> None:
    named = [name for names in class_splits for name in names]
    unknown = sorted(set(named) - set(class_names))
    missing = [name for name in class_names if name not in named]
    repeated = sorted({name for name in named if named.count(name) > 1})
    if unknown or missing or repeated or len(class_splits) < 2:
        raise UserInputError(
            f"class_splits must split the classes {class_names} into two or more steps, each class once; "
            f"unknown {unknown}, missing {missing}, repeated {repeated}, {len(class_splits)} steps"
        )

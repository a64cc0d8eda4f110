import gzip
import struct

import numpy as np
import pytest

from lightning_moe.data.image_sources import (
    fashion_mnist,
    mnist_5k,
    read_idx,
    sklearn_digits,
    textile_images,
)
from lightning_moe.errors import UserInputError


def write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_packaged_digit_sets_are_balanced_grey_images():
    mnist = mnist_5k()
    assert mnist.pixels.shape == (5000, 28, 28) and mnist.pixels.max() == 255
    assert np.bincount(mnist.labels).tolist() == [500] * 10
    assert mnist.image(0).size == (28, 28)
    digits = sklearn_digits()
    assert digits.pixels.shape == (1797, 8, 8) and digits.pixels.max() == 255
    assert sorted(set(digits.labels.tolist())) == list(range(10))


def test_textile_images_have_three_defect_classes():
    textile = textile_images()
    assert len(textile) == 2000
    assert np.bincount(textile.labels).tolist() == [1000, 500, 500]
    assert textile.class_names == ["nominal", "local", "global"]
    assert textile.image(1999).size == (250, 250) and textile.image(1999).mode == "RGB"


def test_fashion_mnist_reads_idx_files_from_a_folder(tmp_path):
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([9, 0, 3]))
    test = fashion_mnist("test", root=tmp_path)
    assert np.array_equal(test.pixels, images) and test.labels.tolist() == [9, 0, 3]
    assert test.class_names[9] == "ankle boot"
    with pytest.raises(UserInputError, match=r"train-images-idx3-ubyte.gz does not exist"):
        fashion_mnist("train", root=tmp_path)
    with pytest.raises(UserInputError, match=r"split must be one of \['test', 'train'\], got 'val'"):
        fashion_mnist("val", root=tmp_path)


def test_idx_reader_refuses_bad_files(tmp_path):
    write_idx(tmp_path / "short.gz", np.zeros((2, 4)))
    assert read_idx(tmp_path / "short.gz").shape == (2, 4)
    with gzip.open(tmp_path / "truncated.gz", "wb") as handle:
        handle.write(struct.pack(">HBBII", 0, 8, 2, 2, 4) + bytes(5))
    with pytest.raises(UserInputError, match=r"holds 5 values; its header promises \[2, 4\] = 8"):
        read_idx(tmp_path / "truncated.gz")
    with gzip.open(tmp_path / "float.gz", "wb") as handle:
        handle.write(struct.pack(">HBBI", 0, 0x0D, 1, 1) + bytes(4))
    with pytest.raises(UserInputError, match="not an IDX file of unsigned bytes"):
        read_idx(tmp_path / "float.gz")

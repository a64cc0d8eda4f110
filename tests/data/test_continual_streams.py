"""Continual-learning streams: fixed tasks, splits and labels; bad task orders and class splits."""

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_moe.data.continual_streams import ClassIncrementalStream, TaskIncrementalStream
from lightning_moe.errors import UserInputError

DIGIT_SPLITS = [["0", "1", "2"], ["3", "4", "5", "6"], ["7", "8", "9"]]


def labels_of(loader) -> list[int]:
    return [int(label) for batch in loader for label in batch["label"]]


def test_task_incremental_stream_has_fixed_tasks_subsets_and_images():
    stream = TaskIncrementalStream(
        ["digits", "textile"], image_size=16, train_size=20, test_size=12, batch_size=8
    )
    digits, textile = stream.tasks
    assert digits.class_names == [str(d) for d in range(10)] and "{}" in digits.templates[0]
    assert textile.class_names[1] == "fabric with a local defect"  # prompt names, not folder names
    assert len(digits.test) == 360  # every fifth of the 1797 digits
    batch = next(iter(stream.train_dataloader()))
    assert batch["image"].shape == (8, 3, 16, 16) and batch["image"].min() >= 0 and batch["image"].max() <= 1
    again = TaskIncrementalStream(
        ["digits", "textile"], image_size=16, train_size=20, test_size=12, batch_size=8
    )
    assert labels_of(stream.test_loader(1)) == labels_of(again.test_loader(1))  # the same fixed subset
    assert set(labels_of(stream.test_loader(1))) <= {0, 1, 2} and len(labels_of(stream.test_loader(1))) == 12
    stream.current_task = 1
    assert set(labels_of(stream.train_dataloader())) <= {0, 1, 2}


def test_test_images_never_appear_in_training():
    stream = TaskIncrementalStream(["digits", "mnist-5k"], image_size=8, train_size=None, test_size=None)
    for task in stream.tasks:
        train = {task.train.pixels[i].tobytes() for i in range(len(task.train))}
        overlap = sum(task.test.pixels[i].tobytes() in train for i in range(len(task.test)))
        assert overlap <= 0.01 * len(task.test)  # only images that occur twice in the source


def test_class_incremental_steps_continue_the_class_order():
    stream = ClassIncrementalStream("digits", DIGIT_SPLITS, image_size=8, train_size=None, test_size=None)
    assert [task.class_names for task in stream.tasks] == DIGIT_SPLITS
    assert [task.label_offset for task in stream.tasks] == [0, 3, 7]
    stream.current_task = 1
    assert set(labels_of(stream.train_dataloader())) == {3, 4, 5, 6}
    test = stream.split(2, "test")
    original = [int(test.images.labels[i]) for i in range(len(test))]
    assert [test[i]["label"] for i in range(len(test))] == original  # digits 7..9 keep labels 7..9 here
    assert set(original) == {7, 8, 9}


def test_image_folder_tasks_read_train_and_test_class_folders(tmp_path):
    for split, count in (("train", 3), ("test", 2)):
        for name in ("cat", "sea_lion"):
            folder = tmp_path / "animals" / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                Image.fromarray(np.full((10, 10, 3), index * 40, dtype=np.uint8)).save(
                    folder / f"{index}.png"
                )
    stream = TaskIncrementalStream(
        [{"name": "animals", "root": str(tmp_path / "animals"), "templates": ["a photo of a {}."]}, "digits"],
        image_size=8,
        train_size=None,
        test_size=None,
    )
    animals = stream.tasks[0]
    assert animals.class_names == ["cat", "sea lion"] and animals.templates == ["a photo of a {}."]
    assert labels_of(stream.test_loader(0)) == [0, 0, 1, 1]
    assert next(iter(stream.train_dataloader()))["image"].dtype == torch.float32


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        (["digits", "cifar10"], "unknown dataset 'cifar10' in the task order"),
        (
            ["digits", {"name": "pets", "root": "/no/such/folder"}],
            "dataset root /no/such/folder of task 'pets' does not exist",
        ),
        (["digits", {"root": "/tmp"}], "needs keys name and root"),
        (["digits"], "at least two tasks"),
        (["digits", "digits"], "task names must be distinct"),
    ],
)
def test_a_bad_task_order_is_one_clear_error(tasks, message):
    with pytest.raises(UserInputError, match=message):
        TaskIncrementalStream(tasks)


@pytest.mark.parametrize(
    ("splits", "message"),
    [
        ([["0", "1"], ["2", "3", "4", "5", "6", "7", "8"]], r"missing \['9'\]"),
        ([["0", "1", "1"], ["2", "3", "4", "5", "6", "7", "8", "9"]], r"repeated \['1'\]"),
        ([["0", "one"], ["2", "3", "4", "5", "6", "7", "8", "9", "1"]], r"unknown \['one'\]"),
        ([[str(d) for d in range(10)]], "1 steps"),
    ],
)
def test_a_class_split_that_does_not_cover_the_classes_is_refused(splits, message):
    with pytest.raises(UserInputError, match=message):
        ClassIncrementalStream("digits", splits)

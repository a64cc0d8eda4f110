"""Concept judges and their data: styles drawn exactly where flagged, judges saved and reloaded."""

import pytest
import torch
from torch.nn import functional as F

from lightning_moe.data.captioned_images import FRAME_WIDTH, StyledImageDataModule
from lightning_moe.errors import UserInputError
from lightning_moe.tasks.diffusion.concept_judge import (
    ConceptJudge,
    ConceptJudgeTask,
    load_concept_judge,
    save_concept_judge,
)


def test_styles_are_drawn_exactly_where_flagged():
    data = StyledImageDataModule(sources=["digits", "mnist-5k"], image_size=16, train_size=40, val_size=10)
    data.setup("fit")
    plain = StyledImageDataModule(
        sources=["digits", "mnist-5k"], image_size=16, train_size=40, val_size=10, styles=[]
    )
    plain.setup("fit")
    styled, original = data.splits["train"], plain.splits["train"]
    assert styled.object_names == ["handwritten digit"]  # both digit sets name the same object
    assert 0 < styled.flags.float().mean() < 1
    for index in range(len(styled)):
        inverted, framed = styled.flags[index].tolist()
        expected = original.images[index] * (-1 if inverted else 1)
        if framed:
            expected = expected.clone()
            for row in range(16):
                for column in range(16):
                    if min(row, column, 15 - row, 15 - column) < FRAME_WIDTH:
                        expected[..., row, column] = 0.0  # mid-grey in [-1, 1]
        torch.testing.assert_close(styled.images[index], expected)


def test_judge_saves_and_reloads_to_the_same_verdicts(tmp_path):
    judge = ConceptJudge("resnet10t", ["bag", "handwritten digit"], ["inverted", "framed"], seed=0).eval()
    save_concept_judge(judge, "resnet10t", tmp_path / "judge")
    reloaded = load_concept_judge(tmp_path / "judge")
    images = torch.rand(3, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        for got, expected in zip(reloaded(images), judge(images), strict=True):
            torch.testing.assert_close(got, expected)
    verdicts = reloaded.judge(images)
    assert set(verdicts) == {"object", "inverted", "framed"} and verdicts["object"].shape == (3,)
    with pytest.raises(UserInputError, match="no concept judge in"):
        load_concept_judge(tmp_path / "missing")


def test_a_judge_of_no_styles_trains_on_the_object_alone():
    task = ConceptJudgeTask(sources=["digits", "textile"], styles=[])
    task.configure_model()
    assert task.model.object_names == ["handwritten digit", "textile swatch"] and task.model.styles is None
    batch = {
        "image": torch.rand(4, 1, 16, 16) * 2 - 1,
        "object": torch.tensor([0, 1, 1, 0]),
        "styles": torch.zeros(4, 0),
    }
    task.model.eval()  # the same batch-norm statistics in both forward passes
    loss, _ = task.task_loss(batch)
    objects, styles = task.model(batch["image"])
    assert styles.shape == (4, 0)
    torch.testing.assert_close(loss, F.cross_entropy(objects, batch["object"]))

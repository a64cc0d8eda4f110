"""Judging generated images against their prompts: single images and two-slot canvases."""

import pytest
import torch

from lightning_moe.data.canvas import CanvasPromptDataModule
from lightning_moe.data.captioned_images import frame
from lightning_moe.data.concept_prompts import collate_prompts
from lightning_moe.errors import UserInputError
from lightning_moe.tasks.diffusion.presence import (
    EMPTY,
    canvas_presence,
    check_judge_knows,
    concept_presence,
    judged_records,
)


class FakeJudge:
    object_names = ["bag", "handwritten digit"]
    style_names = ["inverted", "framed"]


def test_concept_presence_compares_the_verdicts_with_the_prompt():
    verdicts = {
        "object": torch.tensor([1, 0]),
        "inverted": torch.tensor([1, 0]),
        "framed": torch.tensor([1, 1]),
    }
    digit = concept_presence(FakeJudge(), verdicts, 0, "handwritten digit", ["inverted"])
    assert digit == {
        "judged_object": "handwritten digit",
        "judged_styles": ["inverted", "framed"],
        "object_present": True,
        "inverted_present": True,
        "all_present": True,
        "unprompted_style": True,  # framed, not asked for
    }
    bag = concept_presence(FakeJudge(), verdicts, 1, "handwritten digit", ["inverted", "framed"])
    assert (
        bag["object_present"] is False and bag["inverted_present"] is False and bag["framed_present"] is True
    )
    assert bag["all_present"] is False and bag["unprompted_style"] is False


class SlotJudge:
    """Names a crop by its centre pixel (a stand-in for a trained judge) and keeps the crops."""

    object_names = ["handwritten digit", "textile swatch", "sneaker"]
    style_names: list[str] = []

    def __init__(self) -> None:
        self.crops: list[torch.Tensor] = []

    def judge(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        self.crops.append(crops)
        centre = crops[:, 0, crops.shape[-2] // 2, crops.shape[-1] // 2]
        return {"object": torch.bucketize(centre, torch.tensor([-0.2, 0.6]))}


def canvas(left: float | None, right: float | None, framed: bool) -> torch.Tensor:
    """A 24 x 48 canvas with a 12 px square of the given brightness in each slot (None: empty)."""
    image = torch.full((1, 24, 48), -1.0)
    for column, value in ((0, left), (24, right)):
        if value is not None:
            image[:, 6:18, column + 6 : column + 18] = value
    return frame(image) if framed else image


def prompts(objects: list[str], styles: list[str]) -> dict:
    data = CanvasPromptDataModule(objects, styles, fill_objects=["sneaker"], samples=2, batch_size=2)
    data.setup("predict")
    return collate_prompts([data.prompts[0], data.prompts[1]])


def test_each_slot_is_judged_on_its_own_crop():
    judge = SlotJudge()
    batch = prompts(["handwritten digit", "textile swatch"], ["framed"])
    # prompt 0: digit left, textile right; prompt 1: the other way round
    canvases = torch.stack([canvas(-0.4, 0.3, framed=True), canvas(0.3, None, framed=False)])
    records = canvas_presence(judge, canvases, batch["slots"], batch["styles"], batch["layout"])
    for crop, columns in zip(judge.crops, (slice(0, 24), slice(24, 48)), strict=True):
        assert torch.equal(crop, canvases[..., columns])
    assert records[0]["judged_slots"] == {"left": "handwritten digit", "right": "textile swatch"}
    assert records[0]["judged_styles"] == ["framed"]
    assert records[0]["all_present"] and not records[0]["unprompted_style"]
    assert records[1]["judged_slots"] == {"left": "textile swatch", "right": EMPTY}  # no ink: nothing
    assert records[1]["left_present"] and not records[1]["right_present"]
    assert not records[1]["framed_present"] and not records[1]["all_present"]


def test_only_the_lora_concepts_count_towards_all_present():
    judge = SlotJudge()
    batch = prompts(["handwritten digit"], [])  # the other slot holds the fill object, a sneaker
    assert batch["slots"][0] == {"left": "handwritten digit", "right": "sneaker"}
    canvases = torch.stack([canvas(-0.4, -0.4, framed=True), canvas(0.3, -0.4, framed=False)])
    first, second = canvas_presence(judge, canvases, batch["slots"], batch["styles"], batch["layout"])
    # a digit where the sneaker should be: the fill object is wrong, the concept is there
    assert first["left_present"] and not first["right_present"] and first["all_present"]
    assert first["unprompted_style"]  # framed, not asked for
    # prompt 1 puts the digit on the right, where there is one; the left holds no sneaker
    assert second["right_present"] and second["all_present"] and not second["left_present"]


def test_judged_records_route_canvas_and_single_image_batches():
    judge = SlotJudge()
    batch = prompts(["textile swatch"], [])
    canvases = torch.stack([canvas(0.3, 0.9, framed=False), canvas(0.9, 0.3, framed=False)])
    records = judged_records(judge, canvases, batch)
    assert [record["all_present"] for record in records] == [True, True]
    assert [record["judged_slots"]["left"] for record in records] == ["textile swatch", "sneaker"]

    class SingleJudge(FakeJudge):
        def judge(self, images):
            return {"object": torch.tensor([1]), "inverted": torch.tensor([0]), "framed": torch.tensor([1])}

    single = {
        "prompt": ["a handwritten digit 3, framed"],
        "object": ["handwritten digit"],
        "styles": [["framed"]],
    }
    (record,) = judged_records(SingleJudge(), torch.zeros(1, 1, 8, 8), single)
    assert record["judged_object"] == "handwritten digit" and record["all_present"]


def test_a_judge_must_know_every_object_of_the_canvas_prompts():
    data = CanvasPromptDataModule(["handwritten digit"], ["framed"], fill_objects=["pullover"], samples=2)
    data.setup("predict")
    with pytest.raises(UserInputError, match="cannot judge 'pullover'"):
        check_judge_knows(SlotJudge(), data, "runs/judges/canvas_judge")
    data = CanvasPromptDataModule(["handwritten digit"], ["framed"], fill_objects=["sneaker"], samples=2)
    data.setup("predict")
    check_judge_knows(SlotJudge(), data, "runs/judges/canvas_judge")  # the frame needs no judge


def test_judging_without_concept_prompts_is_one_clear_error():
    with pytest.raises(UserInputError, match="needs prompts that say which concepts to expect"):
        check_judge_knows(FakeJudge(), None, "runs/judges/concept_judge")

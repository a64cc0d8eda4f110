"""The two-slot canvases of the composition base: what each slot holds matches its caption,
the frame is drawn and detected, and prompt sets place each concept in both slots."""

import torch

from lightning_moe.data.canvas import (
    CanvasDataModule,
    CanvasPromptDataModule,
    canvas_caption,
    region_mask,
    shows_frame,
    slot_crops,
)


def test_concept_canvases_hold_the_concept_in_the_slot_the_caption_names():
    data = CanvasDataModule(
        source="digits", concept_source="textile", image_size=8, train_size=12, val_size=4
    )
    data.setup("fit")
    canvases = data.splits["train"]
    for index in range(len(canvases)):
        item, layout = canvases[index], canvases.layout(index)
        assert item["image"].shape == (1, 8, 16)
        concept_slot = next(slot for slot, (tiles, _) in layout.items() if tiles is canvases.concept)
        assert f"a textile swatch on the {concept_slot}" in item["caption"]
        tiles, row = layout[concept_slot]
        assert torch.equal(slot_crops(item["image"][None])[concept_slot][0], tiles.pixels[row])
    again = CanvasDataModule(
        source="digits", concept_source="textile", image_size=8, train_size=12, val_size=4
    )
    again.setup("fit")  # canvases are drawn from a per-index seed: a new module draws the same
    assert [again.splits["train"][i]["caption"] for i in range(12)] == [
        canvases[i]["caption"] for i in range(12)
    ]


def test_framed_canvases_are_detected_and_plain_ones_are_not():
    framed = CanvasDataModule(source="digits", styles=["framed"], image_size=24, train_size=16, val_size=4)
    plain = CanvasDataModule(source="digits", image_size=24, train_size=16, val_size=4)
    for data in (framed, plain):
        data.setup("fit")
    framed_images = torch.stack([framed.splits["train"][i]["image"] for i in range(16)])
    plain_images = torch.stack([plain.splits["train"][i]["image"] for i in range(16)])
    assert shows_frame(framed_images).all() and not shows_frame(plain_images).any()
    textile = CanvasDataModule(
        source="digits", concept_source="textile", image_size=24, train_size=16, val_size=4
    )
    textile.setup("fit")  # a grey swatch in one slot, on its part of the ring, is no frame
    assert not shows_frame(torch.stack([textile.splits["train"][i]["image"] for i in range(16)])).any()
    assert framed.splits["train"][0]["caption"].endswith(", framed")


def test_region_masks_split_the_canvas_and_ring_it():
    left, right, border = (region_mask(name, 6, 12) for name in ("left", "right", "border"))
    assert torch.equal(left + right, torch.ones(6, 12)) and left[:, :6].all() and not left[:, 6:].any()
    assert border[0].all() and border[:, -1].all() and not border[1:-1, 1:-1].any()


def test_prompt_sets_place_each_concept_in_both_slots_with_its_layout():
    prompts = CanvasPromptDataModule(objects=["handwritten digit"], styles=["framed"], samples=4)
    prompts.setup("predict")
    items = prompts.prompts.items
    assert [item["layout"]["handwritten digit"] for item in items] == ["left", "right", "left", "right"]
    assert all(item["layout"]["framed"] == "border" for item in items)
    assert all(item["prompt"] == canvas_caption(item["slots"], ["framed"]) for item in items)
    assert items[0]["prompt"] == "a handwritten digit on the left and a sneaker on the right, framed"

"""Prompt sets for composed concepts, and the mix of captioned image sets a gate trains on."""

import pytest
import torch

from lightning_moe.data.captioned_images import CaptionedImageDataModule, CaptionedImageMix
from lightning_moe.data.concept_prompts import ConceptPromptDataModule
from lightning_moe.errors import UserInputError


def test_prompts_name_each_class_with_the_styles_as_training_captions_do():
    data = ConceptPromptDataModule(
        source="digits", styles=["inverted", "framed"], samples_per_prompt=2, batch_size=3
    )
    data.setup("predict")
    batches = list(data.predict_dataloader())
    assert [len(batch["prompt"]) for batch in batches] == [3] * 6 + [2]
    items = [
        dict(zip(batch, values, strict=True))
        for batch in batches
        for values in zip(*batch.values(), strict=True)
    ]
    assert [item["prompt"] for item in items[:3]] == [
        "a handwritten digit 0, inverted, framed",
        "a handwritten digit 0, inverted, framed",
        "a handwritten digit 1, inverted, framed",
    ]
    assert {item["object"] for item in items} == {"handwritten digit"}  # the judge's one digit object
    assert all(item["styles"] == ["inverted", "framed"] for item in items)
    # the same words the LoRA trained on
    training = CaptionedImageDataModule(
        source="digits", styles=["inverted", "framed"], train_size=20, val_size=5
    )
    training.setup("fit")
    assert items[-1]["prompt"] in training.splits["train"].captions


def test_prompt_settings_are_checked():
    with pytest.raises(UserInputError, match="unknown style 'dotted'"):
        ConceptPromptDataModule(styles=["dotted"])
    with pytest.raises(UserInputError, match="source must be one of"):
        ConceptPromptDataModule(source="cifar")


def test_mix_concatenates_its_parts_with_their_own_styles():
    mix = CaptionedImageMix(
        parts=[
            {"source": "digits", "train_size": 6, "val_size": 2},
            {"source": "digits", "styles": ["inverted"], "train_size": 4, "val_size": 3},
        ],
        image_size=8,
        batch_size=5,
    )
    mix.setup("fit")
    train = mix.splits["train"]
    assert len(train) == 10 and len(mix.splits["val"]) == 5
    plain, inverted = train[0], train[6]
    assert "," not in plain["caption"] and inverted["caption"].endswith(", inverted")
    assert plain["image"].shape == (1, 8, 8)
    batch = next(iter(mix.train_dataloader()))
    assert batch["image"].shape == (5, 1, 8, 8)
    alone = CaptionedImageDataModule(source="digits", train_size=4, val_size=3, image_size=8)
    alone.setup("fit")
    assert torch.equal(train[6]["image"], -alone.splits["train"][0]["image"])  # the same part, inverted


def test_mix_refuses_unknown_part_keys_and_no_parts():
    with pytest.raises(UserInputError, match=r"unknown keys \['style'\]"):
        CaptionedImageMix(parts=[{"source": "digits", "style": ["inverted"]}])
    with pytest.raises(UserInputError, match="at least one part"):
        CaptionedImageMix(parts=[])

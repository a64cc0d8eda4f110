import json

import pytest
import torch
from PIL import Image

from lightning_moe.data.collate import IGNORE_INDEX
from lightning_moe.data.llava import AUDIO_TOKEN, IMAGE_TOKEN, write_llava_dataset
from lightning_moe.data.spoken_digits import FRAMES, MELS
from lightning_moe.data.visual_instructions import VisualInstructionDataModule
from lightning_moe.errors import UserInputError

IMAGE_SLOT = "Ā"  # the byte tokenizer's symbol for byte 0, which no text here contains


def write_dataset(folder, records):
    (folder / "images").mkdir(parents=True)
    for name, shade in (("a.png", 40), ("b.png", 200)):
        Image.new("RGB", (10, 10), (shade, shade, shade)).save(folder / "images" / name)
    (folder / "data.json").write_text(json.dumps(records))
    return str(folder / "data.json"), str(folder / "images")


def turn(role, value):
    return {"from": role, "value": value}


RECORDS = [
    {"id": "one", "image": "a.png", "domain": "shade",
     "conversations": [turn("human", f"{IMAGE_TOKEN}\nHow dark?"), turn("gpt", "dark")]},
    {"id": "two", "image": "b.png", "domain": "shade",
     "conversations": [turn("human", f"Look: {IMAGE_TOKEN} ok?"), turn("gpt", "light"),
                       turn("human", "Sure?"), turn("gpt", "yes")]},
]  # fmt: skip


def module(tmp_path, records=RECORDS, **kwargs):
    train_json, train_images = write_dataset(tmp_path / "d", records)
    settings = dict(
        tokenizer="bytes", image_token=IMAGE_SLOT, image_tokens=3, image_size=8,
        train_json=train_json, train_images=train_images, test_json=train_json, test_images=train_images,
        batch_size=2, eval_batch_size=2,
    )  # fmt: skip
    dm = VisualInstructionDataModule(**(settings | kwargs))
    dm.setup()
    return dm


def test_placeholder_becomes_slots_and_only_answers_are_labelled(tmp_path):
    dm = module(tmp_path)
    tokenizer = dm.tokenizer
    for example, record in zip(dm.splits["train"], RECORDS, strict=True):
        assert example.input_ids.count(dm.slots[IMAGE_TOKEN][0]) == 3
        labelled = tokenizer.decode(
            [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX]
        )
        answers = [t["value"] for t in record["conversations"] if t["from"] == "gpt"]
        assert labelled == "".join(f"{answer}</s>\n" for answer in answers)  # each answer and its end of turn
        text = tokenizer.decode(example.input_ids).replace("\x00" * 3, IMAGE_TOKEN)  # slot id = byte 0
        assert text == tokenizer.apply_chat_template(
            [
                {"role": {"human": "user", "gpt": "assistant"}[t["from"]], "content": t["value"]}
                for t in record["conversations"]
            ],
            tokenize=False,
        )
        assert tokenizer.decode(example.prompt_ids).endswith("<s>assistant\n")
    batch = next(iter(dm.val_dataloader()))
    assert batch["pixel_values"].shape == (2, 3, 8, 8)
    assert batch["pixel_values"][0].mean() < batch["pixel_values"][1].mean()  # dark, then light
    assert batch["reference"] == ["dark", "light"] and batch["domain"] == ["shade", "shade"]
    assert batch["question"] == ["How dark?", "Look:  ok?"]
    assert (batch["prompt_mask"][:, -1] == 1).all(), "prompts are left-padded"


def test_image_token_must_be_a_single_unused_token(tmp_path):
    with pytest.raises(
        UserInputError, match=r"image_token 'ab' must be a token of the tokenizer's vocabulary"
    ):
        module(tmp_path / "x", image_token="ab")
    with pytest.raises(UserInputError, match=r"image_token '<pad>' .* other than pad/bos/eos \(got id 256\)"):
        module(tmp_path / "z", image_token="<pad>")
    clash = [RECORDS[0] | {"conversations": [turn("human", f"{IMAGE_TOKEN}\n\x00?"), turn("gpt", "x")]}]
    with pytest.raises(
        UserInputError, match="record 'one': its text contains the slot token id .* of <image> itself"
    ):
        module(tmp_path / "y", records=clash)


def test_missing_image_is_named_with_its_record(tmp_path):
    bad = [RECORDS[0], RECORDS[1] | {"image": "nope.png"}]
    with pytest.raises(UserInputError, match=r"record 1 \(id 'two'\): image .*nope.png does not exist"):
        module(tmp_path, records=bad)


def test_generated_data_is_written_once_and_reused(tmp_path):
    dm = VisualInstructionDataModule(
        tokenizer="bytes", image_token=IMAGE_SLOT, domains=["digits", "grid"], per_domain=4, test_per_domain=2,
        cache_dir=str(tmp_path),
    )  # fmt: skip
    dm.setup()
    assert [e.domain for e in dm.splits["train"]].count("grid") == 4 and len(dm.splits["test"]) == 4
    folders = sorted(p.name for p in (tmp_path / "datasets").iterdir())
    assert folders == ["llava-v2-test-digits-grid-2-seed0", "llava-v2-train-digits-grid-4-seed0"]
    stamp = (tmp_path / "datasets" / folders[0] / "conversations.json").stat().st_mtime_ns
    again = VisualInstructionDataModule(
        tokenizer="bytes", image_token=IMAGE_SLOT, domains=["digits", "grid"], per_domain=4, test_per_domain=2,
        cache_dir=str(tmp_path),
    )  # fmt: skip
    again.setup()
    assert (tmp_path / "datasets" / folders[0] / "conversations.json").stat().st_mtime_ns == stamp
    assert [e.input_ids for e in again.splits["train"]] == [e.input_ids for e in dm.splits["train"]]
    assert torch.is_tensor(next(iter(again.train_dataloader()))["pixel_values"])


AUDIO_SLOT = "ā"  # the byte tokenizer's symbol for byte 1


def test_audio_placeholder_becomes_audio_slots_and_batches_carry_features(tmp_path):
    records = write_llava_dataset(tmp_path / "gen", split="test", domains=("spoken", "digits"), per_domain=2)
    settings = dict(
        tokenizer="bytes", image_token=IMAGE_SLOT, image_tokens=3, image_size=8, audio_token=AUDIO_SLOT,
        audio_tokens=2, train_json=str(records / "conversations.json"), train_images=str(records / "images"),
        test_json=str(records / "conversations.json"), test_images=str(records / "images"), eval_batch_size=4,
    )  # fmt: skip
    dm = VisualInstructionDataModule(**settings)
    dm.setup()
    audio_id, image_id = dm.slots[AUDIO_TOKEN][0], dm.slots[IMAGE_TOKEN][0]
    for example in dm.splits["train"]:
        spoken = example.domain == "spoken"
        assert example.input_ids.count(audio_id) == (2 if spoken else 0)
        assert example.input_ids.count(image_id) == (0 if spoken else 3)
        assert AUDIO_TOKEN not in example.question
    batch = next(iter(dm.val_dataloader()))
    assert batch["domain"] == ["spoken", "spoken", "digits", "digits"]
    assert batch["audio_features"].shape == (2, MELS, FRAMES) and batch["pixel_values"].shape[0] == 2

    without = VisualInstructionDataModule(**(settings | {"audio_token": None}))
    with pytest.raises(
        UserInputError, match="record 'spoken-test-000000' has audio, but the data module has no audio_token"
    ):
        without.setup()
    same = VisualInstructionDataModule(**(settings | {"audio_token": IMAGE_SLOT}))
    with pytest.raises(UserInputError, match="image_token and audio_token are both"):
        same.setup()

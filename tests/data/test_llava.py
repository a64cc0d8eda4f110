import json

import numpy as np
import pytest
from PIL import Image

from lightning_moe.data.llava import AUDIO_TOKEN, IMAGE_TOKEN, read_llava, write_llava_dataset
from lightning_moe.errors import UserInputError

from .test_image_sources import write_idx


@pytest.fixture
def fashion_root(tmp_path):
    """A 20-image stand-in for Fashion-MNIST's test split (the real one is fetched from Debian)."""
    root = tmp_path / "fashion"
    root.mkdir()
    rng = np.random.default_rng(0)
    write_idx(root / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (20, 28, 28)))
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.arange(20) % 10)
    return str(root)


def test_generated_dataset_reads_back_with_correct_answers(tmp_path, fashion_root):
    folder = write_llava_dataset(
        tmp_path / "mm", split="test", per_domain=12, fashion_root=fashion_root, seed=3
    )
    records = read_llava(folder / "conversations.json", folder / "images")
    assert [r.domain for r in records] == [
        d for d in ("fashion", "digits", "textile", "grid") for _ in range(12)
    ]
    for record in records:
        (role, question), (answer_role, answer) = record.turns
        assert (role, answer_role) == ("human", "gpt") and question.startswith(IMAGE_TOKEN + "\n")
        if record.domain == "grid" and question.startswith(("How many", "Count")):
            pixels = np.asarray(Image.open(record.image))
            cells = [pixels[r : r + 28, c : c + 28] for r in (0, 28) for c in (0, 28)]
            assert int(answer) == sum(cell.max() > 0 for cell in cells)
        if record.domain == "textile":
            assert answer in {"no defect", "local defect", "global defect"}
    assert len({r.turns[0][1] for r in records if r.domain == "digits"}) > 1, "several phrasings"
    again = write_llava_dataset(
        tmp_path / "mm2", split="test", per_domain=12, fashion_root=fashion_root, seed=3
    )
    assert (again / "conversations.json").read_text() == (folder / "conversations.json").read_text()


def test_generator_refuses_existing_folders_and_bad_requests(tmp_path):
    existing = tmp_path / "mine"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(UserInputError, match="already exists; choose a new folder"):
        write_llava_dataset(existing, domains=("digits",), per_domain=1)
    assert (existing / "keep.txt").read_text() == "mine"
    with pytest.raises(UserInputError, match=r"unknown domain\(s\) \['faces'\]"):
        write_llava_dataset(tmp_path / "x", domains=("faces",))
    with pytest.raises(UserInputError, match="per_domain=1001 is more than the 1000 MNIST-5k images"):
        write_llava_dataset(tmp_path / "y", split="test", domains=("digits",), per_domain=1001)
    assert not (tmp_path / "y").exists() and not list(tmp_path.glob(".y-*"))


def write_records(tmp_path, records) -> tuple:
    (tmp_path / "images").mkdir(exist_ok=True)
    Image.new("L", (4, 4)).save(tmp_path / "images" / "a.png")
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path, tmp_path / "images"


GOOD = {"id": "ok", "image": "a.png", "conversations": [
    {"from": "human", "value": f"{IMAGE_TOKEN}\nWhat?"}, {"from": "gpt", "value": "This."}]}  # fmt: skip


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (GOOD | {"image": "missing.png"}, r"record 1 \(id 'ok'\): image .*missing.png does not exist"),
        (
            GOOD | {"conversations": [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "x"}]},
            r"record 1 \(id 'ok'\): has an image, so its human turns need exactly one <image> placeholder; found 0",
        ),
        (
            {k: v for k, v in GOOD.items() if k != "image"},
            r"record 1 .*has the placeholder <image> but no 'image'",
        ),
        (
            GOOD | {"conversations": [{"from": "gpt", "value": "x"}]},
            r"record 1 .*turn 0 must be \{'from': 'human'",
        ),
        (GOOD | {"conversations": GOOD["conversations"][:1]}, r"record 1 .*the last turn must be the answer"),
        (
            GOOD | {"conversations": [GOOD["conversations"][0], {"from": "gpt", "value": IMAGE_TOKEN}]},
            r"record 1 .*an answer \('gpt' turn\) contains the image placeholder",
        ),
        ("text", r"record 1: expected an object, got str"),
        (GOOD | {"audio": "missing.wav"}, r"record 1 \(id 'ok'\): audio .*missing.wav does not exist"),
        (
            GOOD | {"audio": "a.png"},
            r"record 1 .*has an audio, so its human turns need exactly one <audio> placeholder; found 0",
        ),
        (
            GOOD
            | {
                "conversations": [
                    {"from": "human", "value": f"{AUDIO_TOKEN}{IMAGE_TOKEN}"},
                    {"from": "gpt", "value": "x"},
                ]
            },
            r"record 1 .*has the placeholder <audio> but no 'audio'",
        ),
    ],
    ids=[
        "missing_image",
        "no_placeholder",
        "placeholder_without_image",
        "roles",
        "no_answer",
        "answer_placeholder",
        "not_object",
        "missing_audio",
        "audio_without_placeholder",
        "audio_placeholder_without_audio",
    ],
)
def test_reader_names_the_bad_record(tmp_path, bad, message):
    path, images = write_records(tmp_path, [GOOD, bad])
    with pytest.raises(UserInputError, match=message):
        read_llava(path, images)


def test_reader_accepts_text_only_records_and_refuses_non_lists(tmp_path):
    text_only = {
        "id": "t",
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
    }
    path, images = write_records(tmp_path, [GOOD, text_only])
    first, second = read_llava(path, images)
    assert first.image == images / "a.png" and second.image is None
    path.write_text(json.dumps({"records": []}))
    with pytest.raises(UserInputError, match="holds a JSON dict; expected a list of records"):
        read_llava(path, images)


def test_digit_splits_hold_every_digit_and_share_no_image(tmp_path):
    """MNIST-5k is sorted by class: a split by row range once left only 8s and 9s for testing."""
    answers, images = {}, {}
    for split in ("train", "test"):
        folder = write_llava_dataset(tmp_path / split, split=split, per_domain=300, domains=("digits",))
        records = read_llava(folder / "conversations.json", folder / "images")
        plain = [r for r in records if r.turns[0][1].endswith(("written here?", "in the image?", "digit."))]
        answers[split] = {r.turns[1][1] for r in plain}
        images[split] = {np.asarray(Image.open(r.image)).tobytes() for r in records}
    assert answers["train"] == answers["test"] == {str(d) for d in range(10)}
    assert not images["train"] & images["test"]

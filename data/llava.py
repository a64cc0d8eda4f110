"""Visual instruction data in the LLaVA conversation format, read and generated.

A dataset is a JSON list of records plus an image folder:

    {"id": "digits-000001", "image": "digits/000001.png", "domain": "digits",
     "conversations": [{"from": "human", "value": "<image>\\nWhich digit is written here?"},
                       {"from": "gpt", "value": "7"}]}

A record may instead (or also) carry `"audio": "<file>.wav"` with an `<audio>` placeholder.
`read_llava` checks every record before any training starts and names the record's index in
its one error. `write_llava_dataset` builds such a dataset from the packaged image sets across
four clearly different image domains, each asked in several phrasings: Fashion-MNIST item names,
handwritten digit values and arithmetic on them, textile defect types, and counting / position
questions about a 2×2 grid of digits. Two more domains serve Uni-MoE's modality stages: the same
arithmetic asked in plain text, and the digit questions about spoken digits (espeak-ng). No real
instruction corpus ships in any package, so these questions and answers are generated from the
labels.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lightning_moe.data.image_sources import ImageSet, fashion_mnist, mnist_5k, textile_images
from lightning_moe.data.spoken_digits import Utterance, draw_utterances, require_espeak, speak
from lightning_moe.errors import UserInputError

IMAGE_TOKEN = "<image>"
AUDIO_TOKEN = "<audio>"
PLACEHOLDERS = {"image": IMAGE_TOKEN, "audio": AUDIO_TOKEN}
ROLES = ("human", "gpt")


@dataclass(frozen=True)
class VisualConversation:
    """One record: its image and audio files (None where it has none) and its (role, text) turns."""

    id: str
    image: Path | None
    turns: list[tuple[str, str]]
    domain: str = ""
    audio: Path | None = None


def read_llava(json_path: str | Path, image_folder: str | Path) -> list[VisualConversation]:
    """Read and check a LLaVA conversation file; image and audio paths are relative to `image_folder`."""
    json_path, image_folder = Path(json_path), Path(image_folder)
    if not json_path.is_file():
        raise UserInputError(f"LLaVA conversation file {json_path} does not exist")
    try:
        records = json.loads(json_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserInputError(f"{json_path} is not valid JSON: {error}") from None
    if not isinstance(records, list):
        raise UserInputError(f"{json_path} holds a JSON {type(records).__name__}; expected a list of records")
    return [_parse_record(record, index, json_path, image_folder) for index, record in enumerate(records)]


def _parse_record(record, index: int, json_path: Path, image_folder: Path) -> VisualConversation:
    where = f"{json_path} record {index}"
    if not isinstance(record, dict):
        raise UserInputError(f"{where}: expected an object, got {type(record).__name__}")
    where += f" (id {record.get('id')!r})"
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise UserInputError(f"{where}: expected a non-empty 'conversations' list")
    parsed = []
    for position, turn in enumerate(turns):
        role = turn.get("from") if isinstance(turn, dict) else None
        value = turn.get("value") if isinstance(turn, dict) else None
        expected_role = ROLES[position % 2]
        if role != expected_role or not isinstance(value, str):
            raise UserInputError(
                f"{where}: turn {position} must be {{'from': {expected_role!r}, 'value': <text>}} "
                "(turns alternate human, gpt), got " + json.dumps(turn)[:120]
            )
        parsed.append((role, value))
    if parsed[-1][0] != "gpt":
        raise UserInputError(f"{where}: the last turn must be the answer ('gpt'), got a 'human' turn")
    media = {kind: _media_file(record, kind, parsed, where, image_folder) for kind in PLACEHOLDERS}
    return VisualConversation(
        str(record.get("id", index)), media["image"], parsed, str(record.get("domain", "")), media["audio"]
    )


def _media_file(record: dict, kind: str, turns, where: str, folder: Path) -> Path | None:
    """The record's `kind` file ("image" or "audio"), checked against its placeholders."""
    placeholder = PLACEHOLDERS[kind]
    count = sum(text.count(placeholder) for role, text in turns if role == "human")
    if any(placeholder in text for role, text in turns if role == "gpt"):
        raise UserInputError(f"{where}: an answer ('gpt' turn) contains the {kind} placeholder {placeholder}")
    name = record.get(kind)
    if name is None:
        if count:
            raise UserInputError(f"{where}: has the placeholder {placeholder} but no {kind!r}")
        return None
    path = folder / str(name)
    if not path.is_file():
        raise UserInputError(f"{where}: {kind} {path} does not exist")
    if count != 1:
        raise UserInputError(
            f"{where}: has an {kind}, so its human turns need exactly one {placeholder} placeholder; found {count}"
        )
    return path


# --- generation -----------------------------------------------------------------------------------

# The fixed splits of the sources without their own: the MNIST-5k rows and textile photos with
# index % 5 == 4 are the test split. Both files are sorted by class, so every class is in both.
GRID_CELL = 28

FASHION_QUESTIONS = [
    "What item of clothing is shown?",
    "Name the fashion item in this picture.",
    "What kind of garment or accessory is this?",
]
IMAGE_DIGIT = {
    "value": ["Which digit is written here?", "What number is shown in the image?", "Read the digit."],
    "plus": "What is the digit in the image plus {}?",
    "times": "Multiply the digit shown by {}. What is the result?",
}
SPOKEN_DIGIT = {
    "value": ["Which digit is spoken?", "What number do you hear?", "Say the digit you hear."],
    "plus": "What is the spoken digit plus {}?",
    "times": "Multiply the spoken digit by {}. What is the result?",
}
TEXTILE_QUESTIONS = [
    "Does this fabric have a defect? Answer no defect, local defect or global defect.",
    "Inspect the textile: no defect, a local defect or a global defect?",
    "Classify the fabric's condition as no defect, local defect or global defect.",
]
TEXTILE_ANSWERS = {"nominal": "no defect", "local": "local defect", "global": "global defect"}
COUNT_QUESTIONS = [
    "How many digits are in the image?",
    "Count the handwritten digits.",
    "How many digits do you see?",
]
CORNERS = ["top-left", "top-right", "bottom-left", "bottom-right"]


@dataclass
class Example:
    image: Image.Image | None  # None: no image
    question: str
    answer: str
    audio: Utterance | None = None  # synthesised when the dataset is written


def _held_out(index: int) -> bool:
    return index % 5 == 4


def _split_indices(count: int, split: str, is_test: Callable[[int], bool]) -> list[int]:
    return [i for i in range(count) if is_test(i) == (split == "test")]


def _sample(rng: random.Random, pool: list[int] | range, count: int, what: str) -> list[int]:
    if count > len(pool):
        raise UserInputError(f"per_domain={count} is more than the {len(pool)} {what} images of this split")
    return rng.sample(pool, count)


def fashion_examples(split: str, count: int, rng: random.Random, root: str | None) -> list[Example]:
    images = fashion_mnist(split, root)
    rows = _sample(rng, range(len(images)), count, "Fashion-MNIST")
    return [
        Example(images.image(i), rng.choice(FASHION_QUESTIONS), images.class_names[images.labels[i]])
        for i in rows
    ]


def digit_examples(split: str, count: int, rng: random.Random, mnist: ImageSet) -> list[Example]:
    rows = _sample(rng, _split_indices(len(mnist), split, _held_out), count, "MNIST-5k")
    return [Example(mnist.image(i), *_digit_question(rng, int(mnist.labels[i]), IMAGE_DIGIT)) for i in rows]


def spoken_examples(split: str, count: int, rng: random.Random) -> list[Example]:
    """The digits domain's questions about a spoken digit (espeak-ng; the test split's voices are
    held out of training, see `spoken_digits`)."""
    return [
        Example(None, *_digit_question(rng, utterance.digit, SPOKEN_DIGIT), audio=utterance)
        for utterance in draw_utterances(split, count, rng)
    ]


def _digit_question(rng: random.Random, digit: int, phrasing: dict) -> tuple[str, str]:
    """One of three questions about a digit: its value, the value plus a number, or times one."""
    kind = rng.randrange(3)
    if kind == 0:
        return rng.choice(phrasing["value"]), str(digit)
    if kind == 1:
        addend = rng.randint(1, 9)
        return phrasing["plus"].format(addend), str(digit + addend)
    factor = rng.randint(2, 5)
    return phrasing["times"].format(factor), str(digit * factor)


def textile_examples(split: str, count: int, rng: random.Random) -> list[Example]:
    textile = textile_images()
    rows = _sample(rng, _split_indices(len(textile), split, _held_out), count, "textile")
    return [
        Example(
            textile.image(i),
            rng.choice(TEXTILE_QUESTIONS),
            TEXTILE_ANSWERS[textile.class_names[textile.labels[i]]],
        )
        for i in rows
    ]


def grid_examples(split: str, count: int, rng: random.Random, mnist: ImageSet) -> list[Example]:
    """1–4 digits in the cells of a 2×2 grid: how many there are, or which digit sits in a corner."""
    pool = _split_indices(len(mnist), split, _held_out)
    examples = []
    for _ in range(count):
        cells = sorted(rng.sample(range(4), rng.randint(1, 4)))
        canvas = np.zeros((2 * GRID_CELL, 2 * GRID_CELL), dtype=np.uint8)
        digits = {}
        for cell in cells:
            row = rng.choice(pool)
            top, left = divmod(cell, 2)
            canvas[top * GRID_CELL : (top + 1) * GRID_CELL, left * GRID_CELL : (left + 1) * GRID_CELL] = (
                mnist.pixels[row]
            )
            digits[cell] = int(mnist.labels[row])
        if rng.random() < 0.5:
            question, answer = rng.choice(COUNT_QUESTIONS), str(len(cells))
        else:
            cell = rng.choice(cells)
            question, answer = f"Which digit is in the {CORNERS[cell]} corner?", str(digits[cell])
        examples.append(Example(Image.fromarray(canvas, mode="L"), question, answer))
    return examples


def arithmetic_examples(split: str, count: int, rng: random.Random) -> list[Example]:
    """Text only: the digits domain's sums and products asked in plain text, with no image, so a
    text expert has single-modality data of its own (the test split uses other operand pairs)."""
    pairs = [(a, b) for a in range(10) for b in range(1, 10) if ((a * 9 + b) % 5 == 4) == (split == "test")]
    examples = []
    for _ in range(count):
        a, b = rng.choice(pairs)
        if rng.random() < 0.5:
            examples.append(Example(None, f"What is {a} plus {b}?", str(a + b)))
        else:
            examples.append(Example(None, f"Multiply {a} by {b}. What is the result?", str(a * b)))
    return examples


DOMAINS = ("fashion", "digits", "textile", "grid")  # the image domains, the default mix
TEXT_DOMAINS = ("arithmetic",)
AUDIO_DOMAINS = ("spoken",)
ALL_DOMAINS = DOMAINS + TEXT_DOMAINS + AUDIO_DOMAINS


def write_llava_dataset(
    folder: str | Path,
    split: str = "train",
    per_domain: int = 500,
    domains: tuple[str, ...] = DOMAINS,
    seed: int = 0,
    fashion_root: str | None = None,
) -> Path:
    """Write `per_domain` examples of each domain as `folder/conversations.json` + `folder/images/`.

    The folder is built beside its final place and renamed into it; an existing folder is never
    touched. The same arguments always give the same dataset.
    """
    folder = Path(folder)
    unknown = sorted(set(domains) - set(ALL_DOMAINS))
    if unknown:
        raise UserInputError(f"unknown domain(s) {unknown}; choose from {list(ALL_DOMAINS)}")
    if split not in ("train", "test"):
        raise UserInputError(f"split must be 'train' or 'test', got {split!r}")
    if folder.exists():
        raise UserInputError(f"{folder} already exists; choose a new folder (nothing was overwritten)")
    rng = random.Random(seed)
    mnist = mnist_5k() if {"digits", "grid"} & set(domains) else None
    makers = {
        "fashion": lambda: fashion_examples(split, per_domain, rng, fashion_root),
        "digits": lambda: digit_examples(split, per_domain, rng, mnist),
        "textile": lambda: textile_examples(split, per_domain, rng),
        "grid": lambda: grid_examples(split, per_domain, rng, mnist),
        "arithmetic": lambda: arithmetic_examples(split, per_domain, rng),
        "spoken": lambda: spoken_examples(split, per_domain, rng),
    }
    if "spoken" in domains:
        require_espeak()  # before anything is written
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        records = []
        for domain in domains:
            (staging / "images" / domain).mkdir(parents=True)
            for number, example in enumerate(makers[domain]()):
                record = {"id": f"{domain}-{split}-{number:06d}", "domain": domain}
                question = example.question
                if example.image is not None:
                    record["image"] = f"{domain}/{number:06d}.png"
                    example.image.save(staging / "images" / record["image"])
                    question = f"{IMAGE_TOKEN}\n{question}"
                if example.audio is not None:
                    record["audio"] = f"{domain}/{number:06d}.wav"
                    speak(example.audio, staging / "images" / record["audio"])
                    question = f"{AUDIO_TOKEN}\n{question}"
                record["conversations"] = [
                    {"from": "human", "value": question},
                    {"from": "gpt", "value": example.answer},
                ]
                records.append(record)
        (staging / "conversations.json").write_text(json.dumps(records, indent=1))
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder

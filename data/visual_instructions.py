"""Visual instruction tuning data: LLaVA conversations tokenised with the chat template, images
as [0, 1] tensors, the `<image>` placeholder expanded to one image-token slot per visual token;
likewise audio files as log-mel features and `<audio>` as one audio-token slot per audio token.

Only the answers (the 'gpt' turns and their end-of-turn tokens) are in the loss; the user turns,
the template and the image slots are masked. Evaluation batches also carry the prompt alone
(left-padded, up to the first answer), the reference answer and the domain.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lightning_moe.assets import default_cache_dir
from lightning_moe.data.collate import IGNORE_INDEX, pad_rows
from lightning_moe.data.llava import (
    AUDIO_TOKEN,
    DOMAINS,
    IMAGE_TOKEN,
    VisualConversation,
    read_llava,
    write_llava_dataset,
)
from lightning_moe.data.sampling import resumed_training_sampler
from lightning_moe.data.splits import require_training_examples
from lightning_moe.data.spoken_digits import wav_features
from lightning_moe.errors import UserInputError
from lightning_moe.tokenization import load_tokenizer

ROLE_NAMES = {"human": "user", "gpt": "assistant"}


@dataclass
class VisualExample:
    input_ids: list[int]
    labels: list[int]
    prompt_ids: list[int]  # up to the first answer, for generation
    image: Path | None
    audio: Path | None
    reference: str
    domain: str
    question: str  # the first user turn, placeholder removed


def image_tensor(path: Path, size: int) -> torch.Tensor:
    """An RGB image resized to size×size, values in [0, 1]: [3, size, size] (the encoder normalises)."""
    with Image.open(path) as image:
        pixels = (
            np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
        )
    return torch.from_numpy(pixels).permute(2, 0, 1)


def encode_conversation(
    conversation: VisualConversation, tokenizer: PreTrainedTokenizerBase, slots: dict[str, tuple[int, int]]
) -> VisualExample:
    """Tokenise turn by turn through the chat template: each piece of rendered text is tokenised
    on its own, so the answer spans (labelled) and the rest (masked) never share a token.
    `slots` maps each placeholder ("<image>", "<audio>") to (slot token id, slots per file)."""
    if conversation.audio is not None and AUDIO_TOKEN not in slots:
        raise UserInputError(
            f"record {conversation.id!r} has audio, but the data module has no audio_token; set "
            "audio_token (and audio_tokens) to give audio its slots"
        )
    messages, rendered = [], ""
    input_ids: list[int] = []
    labels: list[int] = []
    prompt_ids: list[int] | None = None
    for role, text in conversation.turns:
        messages.append({"role": ROLE_NAMES[role], "content": text})
        if role == "human":
            full = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            piece_ids = _ids_with_slots(full[len(rendered) :], tokenizer, slots)
            labelled = False
        else:
            full = tokenizer.apply_chat_template(messages, tokenize=False)
            piece_ids = tokenizer(full[len(rendered) :], add_special_tokens=False).input_ids
            labelled = True
        if not full.startswith(rendered):
            raise UserInputError(
                f"record {conversation.id!r}: the chat template does not render turn by turn"
            )
        rendered = full
        if labelled and prompt_ids is None:
            prompt_ids = list(input_ids)
        input_ids += piece_ids
        labels += piece_ids if labelled else [IGNORE_INDEX] * len(piece_ids)
    media_of = {IMAGE_TOKEN: conversation.image, AUDIO_TOKEN: conversation.audio}
    for placeholder, (token_id, count) in slots.items():
        media = media_of[placeholder]
        if input_ids.count(token_id) != (count if media is not None else 0):
            raise UserInputError(
                f"record {conversation.id!r}: its text contains the slot token id {token_id} of "
                f"{placeholder} itself; choose a slot token that never occurs in the data"
            )
    answer = next(text for role, text in conversation.turns if role == "gpt")
    question = conversation.turns[0][1].replace(IMAGE_TOKEN, "").replace(AUDIO_TOKEN, "").strip()
    return VisualExample(
        input_ids,
        labels,
        prompt_ids,
        conversation.image,
        conversation.audio,
        answer.strip(),
        conversation.domain,
        question,
    )


def _ids_with_slots(text: str, tokenizer, slots: dict[str, tuple[int, int]]) -> list[int]:
    """Text -> ids, each placeholder of `slots` replaced by its run of slot ids."""
    pattern = "(" + "|".join(re.escape(placeholder) for placeholder in slots) + ")"
    ids: list[int] = []
    for part in re.split(pattern, text):
        if part in slots:
            token_id, count = slots[part]
            ids += [token_id] * count
        elif part:
            ids += tokenizer(part, add_special_tokens=False).input_ids
    return ids


def collate_visual(
    examples: list[VisualExample], pad_token_id: int, image_size: int, for_generation: bool
) -> dict:
    """Right-padded ids/mask/labels, and the images and audio features of the examples that have
    them, in order (None where no example has one)."""
    batch = {
        "input_ids": pad_rows([e.input_ids for e in examples], pad_token_id),
        "attention_mask": pad_rows([[1] * len(e.input_ids) for e in examples], 0),
        "labels": pad_rows([e.labels for e in examples], IGNORE_INDEX),
        "pixel_values": _stacked(
            [image_tensor(e.image, image_size) for e in examples if e.image is not None]
        ),
        "audio_features": _stacked(
            [torch.from_numpy(wav_features(e.audio)) for e in examples if e.audio is not None]
        ),
        "domain": [e.domain for e in examples],
    }
    if for_generation:
        batch["prompt_ids"] = pad_rows([e.prompt_ids for e in examples], pad_token_id, left=True)
        batch["prompt_mask"] = pad_rows([[1] * len(e.prompt_ids) for e in examples], 0, left=True)
        batch["reference"] = [e.reference for e in examples]
        batch["question"] = [e.question for e in examples]
    return batch


def _stacked(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    return torch.stack(tensors) if tensors else None


def slot_token_id(tokenizer: PreTrainedTokenizerBase, token: str, what: str = "image_token") -> int:
    """The id of the token that marks image (or audio) slots: one of the vocabulary, not pad/bos/eos."""
    token_id = tokenizer.get_vocab().get(token)
    reserved = {tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id}
    if token_id is None or token_id in reserved:
        raise UserInputError(
            f"{what} {token!r} must be a token of the tokenizer's vocabulary other than "
            f"pad/bos/eos (got id {token_id})"
        )
    return token_id


class VisualInstructionDataModule(L.LightningDataModule):
    """LLaVA-format visual instruction data, from your files or generated from packaged images.

    Without `train_json`, the four-domain dataset of `lightning_moe.data.llava` is generated once
    (deterministic for its arguments) under `<cache>/datasets/` and reused.

    Args:
        tokenizer: Asset name, tokenizer folder or hub id (or "bytes" for tiny test models).
        image_token: A token of the tokenizer's vocabulary (never produced by the text) that marks
            image slots.
        image_tokens: Slots per image: the encoder's feature-map cells at `image_size`
            (EfficientNet-Lite0 at 128 px: 4 × 4 = 16).
        image_size: Images are resized to image_size × image_size.
        audio_token: A token of the vocabulary (never produced by the text) that marks audio
            slots (None: the data has no audio; SmolLM2's "<empty_output>" serves).
        audio_tokens: Slots per audio file: the audio encoder's tokens (8 for
            configs/multimodal/audio_encoder.yaml).
        train_json: LLaVA conversation file for training (with `train_images`).
        train_images: Image folder the training records' paths are relative to.
        test_json: LLaVA conversation file for validation, test and predict (with `test_images`).
        test_images: Image folder of the test records.
        per_domain: Generated examples per domain in the training split.
        test_per_domain: Generated examples per domain in the test split.
        domains: Domains of the generated data.
        seed: Seed of the generated data.
        predict_image: An image file for `predict` to answer `predict_question` about (default:
            predict runs over the test split).
        predict_audio: A WAV file (22050 Hz, 16-bit) for `predict` to answer the question about,
            instead of or with `predict_image` (needs `audio_token`).
        predict_question: The question about `predict_image` / `predict_audio`.
        fashion_root: A Fashion-MNIST folder for the generated "fashion" domain (default: fetched
            once from the Debian package into the cache).
        batch_size: Training examples per batch.
        eval_batch_size: Examples per evaluation batch.
        cache_dir: Where generated data and converted assets live (see `lightning_moe.assets`).
    """

    def __init__(
        self,
        tokenizer: str = "smollm2-135m-instruct",
        image_token: str = "<|endoftext|>",
        image_tokens: int = 16,
        image_size: int = 128,
        audio_token: str | None = None,
        audio_tokens: int = 8,
        train_json: str | None = None,
        train_images: str | None = None,
        test_json: str | None = None,
        test_images: str | None = None,
        per_domain: int = 500,
        test_per_domain: int = 50,
        domains: list[str] | None = None,
        seed: int = 0,
        predict_image: str | None = None,
        predict_audio: str | None = None,
        predict_question: str = "What is shown in the image?",
        fashion_root: str | None = None,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        for json_file, folder in ((train_json, train_images), (test_json, test_images)):
            if (json_file is None) != (folder is None):
                raise UserInputError(
                    "give a LLaVA json file together with its image folder (train_images/test_images)"
                )
        self.tokenizer_name = tokenizer
        self.image_token = image_token
        self.image_tokens = image_tokens
        self.image_size = image_size
        self.audio_token = audio_token
        self.audio_tokens = audio_tokens
        self.files = {"train": (train_json, train_images), "test": (test_json, test_images)}
        self.sizes = {"train": per_domain, "test": test_per_domain}
        self.domains = tuple(domains or DOMAINS)
        self.seed = seed
        self.fashion_root = fashion_root
        for name, path in (("predict_image", predict_image), ("predict_audio", predict_audio)):
            if path is not None and not Path(path).is_file():
                raise UserInputError(f"{name} {path} does not exist")
        self.predict_image = predict_image
        self.predict_audio = predict_audio
        self.predict_question = predict_question
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.cache_dir = cache_dir
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.slots: dict[str, tuple[int, int]] = {}
        self.splits: dict[str, list[VisualExample]] = {}

    def conversations(self, split: str) -> list[VisualConversation]:
        json_file, folder = self.files[split]
        if json_file is None:
            cache = Path(self.cache_dir) if self.cache_dir else default_cache_dir()
            # v2: the digit domains split MNIST-5k by index % 5, not by row range (a cache of v1 is stale)
            name = f"llava-v2-{split}-{'-'.join(self.domains)}-{self.sizes[split]}-seed{self.seed}"
            folder = cache / "datasets" / name
            if not folder.exists():
                write_llava_dataset(
                    folder, split, self.sizes[split], self.domains, self.seed, self.fashion_root
                )
            json_file, folder = folder / "conversations.json", folder / "images"
        return read_llava(json_file, folder)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.tokenizer = load_tokenizer(self.tokenizer_name, self.cache_dir)
        self.slots = {IMAGE_TOKEN: (slot_token_id(self.tokenizer, self.image_token), self.image_tokens)}
        if self.audio_token is not None:
            if self.audio_token == self.image_token:
                raise UserInputError(
                    f"image_token and audio_token are both {self.image_token!r}; give two tokens"
                )
            audio_id = slot_token_id(self.tokenizer, self.audio_token, "audio_token")
            self.slots[AUDIO_TOKEN] = (audio_id, self.audio_tokens)
        self.splits = {
            split: [encode_conversation(c, self.tokenizer, self.slots) for c in self.conversations(split)]
            for split in ("train", "test")
        }
        if stage in ("fit", None):
            require_training_examples(self.splits["train"], self)

    def _loader(self, split: str) -> DataLoader:
        examples = self.splits[split] if split != "predict" else self._predict_examples()
        training = split == "train"
        collate = partial(
            collate_visual,
            pad_token_id=self.tokenizer.pad_token_id,
            image_size=self.image_size,
            for_generation=not training,
        )
        if training:
            sampler = resumed_training_sampler(self, len(examples), self.seed, self.batch_size)
            return DataLoader(examples, batch_size=self.batch_size, sampler=sampler, collate_fn=collate)
        return DataLoader(examples, batch_size=self.eval_batch_size, collate_fn=collate)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("test")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")

    def _predict_examples(self) -> list[VisualExample]:
        if self.predict_image is None and self.predict_audio is None:
            return self.splits["test"]
        image, audio = (Path(p) if p else None for p in (self.predict_image, self.predict_audio))
        placeholders = "".join(
            token for token, media in ((IMAGE_TOKEN, image), (AUDIO_TOKEN, audio)) if media
        )
        question = VisualConversation(
            "predict",
            image,
            [("human", f"{placeholders}\n{self.predict_question}"), ("gpt", "")],
            audio=audio,
        )
        return [encode_conversation(question, self.tokenizer, self.slots)]

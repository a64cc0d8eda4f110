"""A small mixed-domain text task for smoke runs: each domain is a string transformation a tiny
model can learn in minutes on a CPU, and distinct enough that experts can specialise."""

from __future__ import annotations

import random
from collections.abc import Callable
from functools import partial

import lightning as L
from torch.utils.data import DataLoader

from lightning_moe.data.collate import PromptCompletion, collate_prompt_completion
from lightning_moe.data.sampling import resumed_training_sampler
from lightning_moe.data.splits import require_training_examples
from lightning_moe.errors import UserInputError
from lightning_moe.tokenization import load_tokenizer

LETTERS = "abcdefgh"


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = _word(rng)
    return f"reverse {word} =", f" {word[::-1]}"


def _sort(rng: random.Random) -> tuple[str, str]:
    word = _word(rng)
    return f"sort {word} =", f" {''.join(sorted(word))}"


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return f"add {a}+{b} =", f" {a + b}"


def _upper(rng: random.Random) -> tuple[str, str]:
    word = _word(rng)
    return f"upper {word} =", f" {word.upper()}"


DOMAINS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "reverse": _reverse,
    "sort": _sort,
    "add": _add,
    "upper": _upper,
}
SPLIT_SEED_OFFSET = {"train": 0, "val": 1_000, "test": 2_000}


class SyntheticTextDataModule(L.LightningDataModule):
    """Prompt/completion pairs drawn evenly from several string-transformation domains.

    Args:
        tokenizer: Tokenizer name or folder ("bytes" = the in-code byte tokenizer).
        domains: Which domains to mix (reverse, sort, add, upper).
        train_size: Training examples.
        val_size: Validation examples.
        test_size: Test examples.
        batch_size: Examples per batch; each batch is padded to its longest sequence.
        seed: Generation seed; the splits use disjoint derived seeds.
        pad_to_multiple_of: Round every batch's length up to a multiple of this (a compiled
            model then sees few distinct shapes and recompiles less); None: the longest sequence.
    """

    def __init__(
        self,
        tokenizer: str = "bytes",
        domains: list[str] | None = None,
        train_size: int = 2000,
        val_size: int = 200,
        test_size: int = 200,
        batch_size: int = 16,
        seed: int = 0,
        pad_to_multiple_of: int | None = None,
    ) -> None:
        super().__init__()
        self.domains = list(domains or DOMAINS)
        unknown = [d for d in self.domains if d not in DOMAINS]
        if unknown:
            raise UserInputError(f"unknown synthetic domain(s) {unknown}; expected some of {sorted(DOMAINS)}")
        self.tokenizer_name = tokenizer
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.batch_size = batch_size
        self.seed = seed
        self.pad_to_multiple_of = pad_to_multiple_of
        self.splits: dict[str, list[PromptCompletion]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.tokenizer = load_tokenizer(self.tokenizer_name)
        for split, size in self.sizes.items():
            rng = random.Random(self.seed + SPLIT_SEED_OFFSET[split])
            self.splits[split] = [
                self._example(rng, self.domains[i % len(self.domains)]) for i in range(size)
            ]
        if stage in ("fit", None):
            require_training_examples(self.splits["train"], self, "train_size is 0")

    def _example(self, rng: random.Random, domain: str) -> PromptCompletion:
        prompt, completion = DOMAINS[domain](rng)
        prompt_ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
        completion_ids = self.tokenizer(completion, add_special_tokens=False).input_ids + [
            self.tokenizer.eos_token_id
        ]
        return PromptCompletion(prompt_ids, completion_ids, domain)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        examples = self.splits[split]
        sampler = (
            resumed_training_sampler(self, len(examples), self.seed, self.batch_size) if shuffle else None
        )
        collate = partial(
            collate_prompt_completion,
            pad_token_id=self.tokenizer.pad_token_id,
            pad_to_multiple_of=self.pad_to_multiple_of,
        )
        return DataLoader(examples, batch_size=self.batch_size, sampler=sampler, collate_fn=collate)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

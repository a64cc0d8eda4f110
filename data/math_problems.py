"""Math problems with solutions ending in `#### <answer>` (the GSM8K format).

Two sources: reasoning-gym generators (`gsm_symbolic`, GSM8K-style templates with fresh numbers
and worked solutions, or any other task with a numeric answer, e.g. `chain_sum`, whose solution
is the bare `#### <answer>` line), and GSM8K-format jsonl files (`question`, `answer` = worked
solution ending in `#### N`). Every problem names its source task as its `domain`.

reasoning-gym draws problem i of a dataset with seed s from `Random(s + i)`, so two datasets
whose seed RANGES [s, s + size) overlap share problems. Splits therefore get far-apart base
seeds, overlapping ranges are refused, and any training problem whose question also appears in
an evaluation split is dropped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import partial
from itertools import pairwise
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from lightning_moe.data.collate import PromptCompletion, collate_prompt_completion
from lightning_moe.data.sampling import resumed_training_sampler
from lightning_moe.data.splits import require_training_examples
from lightning_moe.errors import UserInputError
from lightning_moe.tokenization import load_tokenizer

ANSWER_MARKER = "#### "
# The fixed held-out test set: gsm_symbolic problems from seeds 1_000_000 .. 1_000_000 + test_size - 1.
TEST_SEED = 1_000_000
VAL_SEED = 2_000_000
DEFAULT_INSTRUCTION = "Solve the problem step by step. End with a last line '#### <answer>'."


@dataclass(frozen=True)
class MathProblem:
    """A question, its solution (ending in `#### answer`), the bare answer and its source task;
    `entry` is the reasoning-gym item it came from (what the task's verifier scores against)."""

    question: str
    solution: str
    answer: str
    domain: str = "math"
    entry: dict | None = None


def reasoning_gym_problems(task: str, size: int, seed: int, options: dict | None = None) -> list[MathProblem]:
    """`size` problems of a reasoning-gym task from seeds seed .. seed+size-1, generated with the
    task's config `options` (e.g. chain_sum's max_digits).

    `gsm_symbolic` keeps its worked solution; other tasks get the bare `#### <answer>` line.
    """
    import reasoning_gym  # imported here: it loads many generator modules
    from reasoning_gym.factory import DATASETS

    if task not in DATASETS:
        raise UserInputError(
            f"unknown reasoning-gym task {task!r}; known tasks include {sorted(DATASETS)[:12]}"
        )
    problems = []
    if size == 0:  # reasoning-gym refuses empty datasets
        return problems
    options = options or {}
    known = set(DATASETS[task][1].__dataclass_fields__) - {"size", "seed"}
    if set(options) - known:
        raise UserInputError(
            f"reasoning-gym task {task!r} has no option(s) {sorted(set(options) - known)}; known: {sorted(known)}"
        )
    try:
        dataset = reasoning_gym.create_dataset(task, size=size, seed=seed, **options)
    except (AssertionError, ValueError) as error:  # reasoning-gym validates its configs with asserts
        raise UserInputError(f"reasoning-gym task {task!r} refuses options {options}: {error}") from None
    for item in dataset:
        answer = str(item["answer"])
        solution = item["metadata"].get("answer_cot") or ANSWER_MARKER + answer
        problems.append(MathProblem(item["question"], solution, answer, task, item))
    return problems


def check_disjoint_seed_ranges(ranges: dict[str, tuple[int, int]]) -> None:
    """Refuse splits whose generator seed ranges [seed, seed + size) overlap."""
    spans = sorted((seed, seed + size, split) for split, (seed, size) in ranges.items() if size > 0)
    for (_, end, first), (start, _, second) in pairwise(spans):
        if start < end:
            raise UserInputError(
                f"the {first} and {second} splits use overlapping generator seeds "
                f"({ranges[first]} and {ranges[second]} as (seed, size)); "
                "give each split a seed at least its size away from the others"
            )


def read_gsm8k_jsonl(path: str | Path) -> list[MathProblem]:
    """Problems from a GSM8K-format jsonl file (an optional string `domain` names each one's task);
    a bad line is reported with its number."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"math problem file {path} does not exist")
    problems = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                problems.append(_parse_gsm8k_line(line, f"{path}:{number}"))
    if not problems:
        raise UserInputError(f"math problem file {path} has no problems")
    return problems


def _parse_gsm8k_line(line: str, where: str) -> MathProblem:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise UserInputError(f"{where}: not valid JSON ({error.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("question"), str):
        raise UserInputError(f"{where}: expected an object with a string 'question'")
    solution = record.get("answer")
    if not isinstance(solution, str) or ANSWER_MARKER not in solution:
        raise UserInputError(f"{where}: expected a string 'answer' ending in '{ANSWER_MARKER}<number>'")
    answer = solution.rsplit(ANSWER_MARKER, 1)[1].strip()
    if not re.fullmatch(r"-?[\d,]*\.?\d+", answer.replace("$", "")):
        raise UserInputError(
            f"{where}: the final answer {answer!r} after '{ANSWER_MARKER.strip()}' is not a number"
        )
    domain = record.get("domain", "math")
    if not isinstance(domain, str):
        raise UserInputError(f"{where}: 'domain' must be a string, got {domain!r}")
    return MathProblem(record["question"], solution, answer, domain)


class MathDataModule(L.LightningDataModule):
    """Math word problems for supervised fine-tuning and generation-based evaluation.

    Each split is generated by reasoning-gym (`tasks`, `gsm_symbolic` by default; with several
    tasks every split holds `<split>_size` problems of each, shuffled together in training)
    unless a GSM8K-format jsonl file is given for it. Prompts go through the tokenizer's chat template (question + instruction as
    the user turn); the loss covers only the solution tokens and the end-of-turn token; batches
    are padded to their longest sequence. Evaluation batches also carry the left-padded prompts
    and reference answers for greedy generation.

    Args:
        tokenizer: Asset name, tokenizer folder or hub id (or "bytes" for tiny test models).
        tasks: reasoning-gym tasks with numeric answers to generate problems from; each problem's
            task is its `domain` (scored per domain in prediction files).
        task_options: Generator options per task, e.g. {chain_sum: {max_digits: 2}}; options of
            tasks not in `tasks` are unused (one config can serve single-task runs).
        train_file: GSM8K-format jsonl for training (default: generated).
        val_file: GSM8K-format jsonl for validation (default: generated).
        test_file: GSM8K-format jsonl for test and predict (default: generated, the fixed test set).
        train_size: Generated training problems per task.
        val_size: Generated validation problems per task.
        test_size: Generated test problems per task.
        train_seed: First generator seed of the training split.
        val_seed: First generator seed of the validation split.
        test_seed: First generator seed of the test split (keep it fixed to compare runs).
        instruction: Appended to every question in the user turn.
        batch_size: Training examples per batch.
        eval_batch_size: Examples per validation/test/predict batch (generation runs batched).
        max_length: Truncate prompt + solution to this many tokens (None: no truncation).
        pad_to_multiple_of: Round every batch's length up to a multiple of this, so a compiled
            model sees few distinct shapes (None: pad to the longest sequence).
        cache_dir: Where converted packaged assets are cached (see `lightning_moe.assets`).
    """

    def __init__(
        self,
        tokenizer: str = "smollm2-135m-instruct",
        tasks: list[str] | None = None,
        task_options: dict[str, dict] | None = None,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        train_size: int = 2000,
        val_size: int = 64,
        test_size: int = 200,
        train_seed: int = 0,
        val_seed: int = VAL_SEED,
        test_seed: int = TEST_SEED,
        instruction: str = DEFAULT_INSTRUCTION,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.tasks = list(tasks or ["gsm_symbolic"])
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise UserInputError(f"tasks must name distinct reasoning-gym tasks, got {self.tasks}")
        self.task_options = dict(task_options or {})
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        self.generated = {
            split: (seed, size)
            for split, seed, size in [
                ("train", train_seed, train_size),
                ("val", val_seed, val_size),
                ("test", test_seed, test_size),
            ]
            if self.files[split] is None
        }
        check_disjoint_seed_ranges(self.generated)
        for split, file in self.files.items():
            if file is not None and not Path(file).is_file():
                raise UserInputError(f"{split}_file {file} does not exist")
        self.tokenizer_name = tokenizer
        self.instruction = instruction
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.cache_dir = cache_dir
        self.tokenizer = None
        self.splits: dict[str, list[PromptCompletion]] = {}

    def problems(self, split: str) -> list[MathProblem]:
        if self.files[split] is not None:
            return read_gsm8k_jsonl(self.files[split])
        seed, size = self.generated[split]
        return [
            problem
            for task in self.tasks
            for problem in reasoning_gym_problems(task, size, seed, self.task_options.get(task))
        ]

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.tokenizer = load_tokenizer(self.tokenizer_name, self.cache_dir)
        problems = {split: self.problems(split) for split in ("train", "val", "test")}
        held_out = {p.question for split in ("val", "test") for p in problems[split]}
        offered = len(problems["train"])
        problems["train"] = [p for p in problems["train"] if p.question not in held_out]
        if stage in ("fit", None):
            why = (
                f"all {offered} training problems also appear in the validation or test split"
                if offered
                else ""
            )
            require_training_examples(problems["train"], self, why)
        self.splits = {split: [self.encode(p) for p in items] for split, items in problems.items()}

    def prompt_text(self, question: str) -> str:
        return f"{question}\n{self.instruction}" if self.instruction else question

    def encode(self, problem: MathProblem) -> PromptCompletion:
        text = self.prompt_text(problem.question)
        prompt_ids = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        solution_ids = self.tokenizer(problem.solution, add_special_tokens=False).input_ids
        return PromptCompletion(
            list(prompt_ids),
            solution_ids + [self.tokenizer.eos_token_id],
            problem.domain,
            text,
            problem.answer,
            problem.entry,
        )

    def _loader(self, split: str) -> DataLoader:
        examples = self.splits[split]
        training = split == "train"
        collate = partial(
            collate_prompt_completion,
            pad_token_id=self.tokenizer.pad_token_id,
            max_length=self.max_length,
            for_generation=not training,
            pad_to_multiple_of=self.pad_to_multiple_of,
        )
        if training:
            sampler = resumed_training_sampler(self, len(examples), 0, self.batch_size)
            return DataLoader(examples, batch_size=self.batch_size, sampler=sampler, collate_fn=collate)
        return DataLoader(examples, batch_size=self.eval_batch_size, collate_fn=collate)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")

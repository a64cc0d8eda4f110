import json

import pytest

from lightning_moe.data.collate import IGNORE_INDEX
from lightning_moe.data.math_problems import (
    MathDataModule,
    check_disjoint_seed_ranges,
    read_gsm8k_jsonl,
    reasoning_gym_problems,
)
from lightning_moe.errors import UserInputError


def small_module(**kwargs) -> MathDataModule:
    settings = dict(
        tokenizer="bytes", train_size=12, val_size=3, test_size=5, batch_size=4, eval_batch_size=2
    )
    return MathDataModule(**(settings | kwargs))


def write_jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_generated_problems_end_in_their_answer():
    problems = reasoning_gym_problems("gsm_symbolic", size=5, seed=7)
    assert len(problems) == 5
    for problem in problems:
        assert problem.solution.rstrip().endswith(f"#### {problem.answer}")
    assert reasoning_gym_problems("gsm_symbolic", size=5, seed=7) == problems


def test_overlapping_seed_ranges_are_refused():
    # problem i of seed s is drawn from Random(s + i): seeds 0 (size 10) and 5 share problems
    with pytest.raises(UserInputError, match=r"train and val splits use overlapping generator seeds"):
        check_disjoint_seed_ranges({"train": (0, 10), "val": (5, 4), "test": (100, 5)})
    check_disjoint_seed_ranges({"train": (0, 10), "val": (10, 4), "test": (100, 5)})
    with pytest.raises(UserInputError, match="overlapping"):
        MathDataModule(train_seed=0, train_size=100, test_seed=50)


def test_gsm8k_jsonl_reader(tmp_path):
    path = write_jsonl(
        tmp_path / "gsm8k.jsonl",
        [
            {"question": "2+2?", "answer": "2+2=4\n#### 4"},
            "",
            {"question": "cost?", "answer": "x\n#### $1,200"},
        ],
    )
    problems = read_gsm8k_jsonl(path)
    assert [(p.question, p.answer) for p in problems] == [("2+2?", "4"), ("cost?", "$1,200")]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", r":3: not valid JSON"),
        (json.dumps({"answer": "#### 3"}), r":3: expected an object with a string 'question'"),
        (
            json.dumps({"question": "q", "answer": "no marker 3"}),
            r":3: expected a string 'answer' ending in '#### ",
        ),
        (
            json.dumps({"question": "q", "answer": "#### three"}),
            r":3: the final answer 'three' .* is not a number",
        ),
    ],
)
def test_bad_jsonl_line_is_reported_with_its_number(tmp_path, bad_line, message):
    good = json.dumps({"question": "q", "answer": "#### 1"})
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, bad_line, good])
    with pytest.raises(UserInputError, match=message):
        read_gsm8k_jsonl(path)


def test_missing_split_file_is_refused_at_construction(tmp_path):
    with pytest.raises(UserInputError, match=r"test_file .*nope.jsonl does not exist"):
        small_module(test_file=str(tmp_path / "nope.jsonl"))


def test_loss_covers_only_the_solution_and_end_of_turn():
    dm = small_module()
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    tokenizer = dm.tokenizer
    for row in range(batch["input_ids"].shape[0]):
        labels = batch["labels"][row]
        supervised = labels[labels != IGNORE_INDEX].tolist()
        text = tokenizer.decode(supervised)
        assert text.endswith(tokenizer.eos_token)
        assert "#### " in text and "<s>assistant" not in text
        # everything before the supervised span is the chat-formatted prompt
        first = int((labels != IGNORE_INDEX).nonzero()[0])
        prompt = tokenizer.decode(batch["input_ids"][row, :first].tolist())
        assert prompt.startswith("<s>user\n") and prompt.endswith("<s>assistant\n")
        assert dm.instruction in prompt


def test_batches_are_padded_to_their_longest_example():
    dm = small_module()
    dm.setup()
    for batch in dm.train_dataloader():
        lengths = batch["attention_mask"].sum(dim=1)
        assert batch["input_ids"].shape[1] == int(lengths.max())


def test_evaluation_batches_carry_left_padded_prompts_and_references():
    dm = small_module()
    dm.setup()
    batch = next(iter(dm.test_dataloader()))
    examples = dm.splits["test"][:2]
    width = batch["prompt_ids"].shape[1]
    for row, example in enumerate(examples):
        n = len(example.prompt_ids)
        assert batch["prompt_ids"][row, width - n :].tolist() == example.prompt_ids
        assert batch["prompt_mask"][row].tolist() == [0] * (width - n) + [1] * n
    assert batch["reference"] == [e.reference for e in examples]
    assert all(text.endswith(dm.instruction) for text in batch["prompt_text"])


def test_splits_are_fixed_and_training_excludes_held_out_questions(tmp_path):
    held_out = reasoning_gym_problems("gsm_symbolic", size=2, seed=0)
    test_file = write_jsonl(
        tmp_path / "test.jsonl", [{"question": p.question, "answer": p.solution} for p in held_out]
    )
    dm = small_module(test_file=str(test_file))
    dm.setup()
    train_prompts = {e.prompt_text for e in dm.splits["train"]}
    assert len(dm.splits["train"]) == 10  # the two problems also in the test file are dropped
    assert not {e.prompt_text for e in dm.splits["test"]} & train_prompts
    again = small_module(test_file=str(test_file))
    again.setup()
    assert [e.prompt_ids for e in again.splits["val"]] == [e.prompt_ids for e in dm.splits["val"]]


def test_several_tasks_give_sized_splits_with_domains():
    dm = small_module(tasks=["chain_sum", "gcd"], train_size=5, val_size=2, test_size=3)
    dm.setup()
    for split, size in [("train", 5), ("val", 2), ("test", 3)]:
        domains = [e.domain for e in dm.splits[split]]
        assert domains.count("chain_sum") == size and domains.count("gcd") == size
    gcd = next(e for e in dm.splits["test"] if e.domain == "gcd")
    completion = dm.tokenizer.decode(gcd.completion_ids, skip_special_tokens=True)
    assert completion == f"#### {gcd.reference}"  # tasks without a worked solution answer directly
    batch = next(iter(dm.test_dataloader()))
    assert batch["domain"] == [e.domain for e in dm.splits["test"][: len(batch["domain"])]]


def test_unknown_task_and_jsonl_domain(tmp_path):
    with pytest.raises(UserInputError, match="unknown reasoning-gym task 'chain_sums'"):
        small_module(tasks=["chain_sums"]).setup()
    with pytest.raises(UserInputError, match="distinct"):
        small_module(tasks=["gcd", "gcd"])
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "1+1?", "answer": "#### 2", "domain": "sums"}])
    assert read_gsm8k_jsonl(path)[0].domain == "sums"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "1+1?", "answer": "#### 2", "domain": 3}])
    with pytest.raises(UserInputError, match=r"bad.jsonl:1: 'domain' must be a string"):
        read_gsm8k_jsonl(bad)


def test_task_options_set_the_generator_difficulty():
    easy = reasoning_gym_problems("chain_sum", size=20, seed=3, options={"max_digits": 1, "max_terms": 2})
    assert all(abs(int(p.answer)) < 20 for p in easy)
    with pytest.raises(
        UserInputError, match=r"task 'chain_sum' has no option\(s\) \['max_digit'\]; known: .*max_digits"
    ):
        reasoning_gym_problems("chain_sum", size=2, seed=0, options={"max_digit": 1})
    with pytest.raises(UserInputError, match=r"task 'chain_sum' refuses options .*max_digits"):
        reasoning_gym_problems("chain_sum", size=2, seed=0, options={"min_digits": 3, "max_digits": 1})

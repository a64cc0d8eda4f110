import pytest

from lightning_moe.data.sampling import EpochSeededSampler
from lightning_moe.data.synthetic_text import SyntheticTextDataModule
from lightning_moe.errors import UserInputError


def _decoded(dm, example):
    return dm.tokenizer.decode(example.prompt_ids), dm.tokenizer.decode(example.completion_ids)


def test_examples_are_correct_and_domains_mixed_evenly():
    dm = SyntheticTextDataModule(train_size=40, val_size=8, test_size=8, batch_size=4)
    dm.setup()
    domains = [e.domain for e in dm.splits["train"]]
    assert {d: domains.count(d) for d in set(domains)} == {"reverse": 10, "sort": 10, "add": 10, "upper": 10}
    for example in dm.splits["train"]:
        prompt, completion = _decoded(dm, example)
        op, argument, _ = prompt.split(" ")
        answer = completion.removesuffix("</s>").strip()
        expected = {
            "reverse": lambda s: s[::-1],
            "sort": lambda s: "".join(sorted(s)),
            "upper": str.upper,
            "add": lambda s: str(sum(int(v) for v in s.split("+"))),
        }[op](argument)
        assert answer == expected


def test_splits_differ_and_are_reproducible():
    a = SyntheticTextDataModule(train_size=50, val_size=50, test_size=50)
    b = SyntheticTextDataModule(train_size=50, val_size=50, test_size=50)
    a.setup()
    b.setup()
    assert [e.prompt_ids for e in a.splits["train"]] == [e.prompt_ids for e in b.splits["train"]]
    assert [e.prompt_ids for e in a.splits["train"]] != [e.prompt_ids for e in a.splits["val"]]


def test_batches_are_padded_to_the_longest_example_in_the_batch():
    dm = SyntheticTextDataModule(train_size=32, batch_size=8)
    dm.setup()
    for batch in dm.val_dataloader():
        lengths = batch["attention_mask"].sum(dim=1)
        assert batch["input_ids"].shape[1] == int(lengths.max())


def test_epoch_seeded_sampler_depends_only_on_seed_and_epoch():
    first, second = EpochSeededSampler(20, seed=3), EpochSeededSampler(20, seed=3)
    list(first)  # consuming an epoch must not change the next one
    first.set_epoch(1)
    second.set_epoch(1)
    assert list(first) == list(second)
    second.set_epoch(2)
    assert list(first) != list(second)
    assert sorted(second) == list(range(20))


def test_unknown_domain_is_one_clear_error():
    with pytest.raises(UserInputError, match="unknown synthetic domain.*'poetry'"):
        SyntheticTextDataModule(domains=["add", "poetry"])

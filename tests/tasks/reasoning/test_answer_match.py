import pytest
import torch

from lightning_moe.tasks.reasoning.answer_match import AnswerMatch, answers_match, extract_answer


@pytest.mark.parametrize(
    ("output", "strict", "flexible"),
    [
        ("3 + 4 = 7\n#### 7", "7", "7"),
        ("#### 1,234.", "1234", "1234"),
        ("It costs $1,000.\n#### $1,000", "1000", "1000"),
        ("#### -12", "-12", "-12"),
        ("#### 2.50", "2.50", "2.50"),
        ("so the answer is 42.", None, "42"),
        ("first #### 5 then #### 6", "5", "6"),
        ("####5 without the space", None, "5"),
        ("no number here", None, None),
        ("", None, None),
        ("ratio 3:4, answer 9", None, "9"),
        ("a lone minus - and 8", None, "8"),
    ],
)
def test_strict_and_flexible_extraction(output, strict, flexible):
    assert extract_answer(output, "strict") == strict
    assert extract_answer(output, "flexible") == flexible


@pytest.mark.parametrize(
    ("predicted", "reference", "equal"),
    [
        ("18", "18", True),
        ("18.0", "18", True),
        ("1000", "1,000", True),
        ("17", "18", False),
        (None, "18", False),
        ("-3", "3", False),
        ("..", "18", False),
    ],
)
def test_answers_compare_as_numbers(predicted, reference, equal):
    assert answers_match(predicted, reference) is equal


def test_metric_accumulates_over_batches_and_resets():
    metric = AnswerMatch("strict")
    metric.update(["#### 4", "#### 5"], ["4", "4"])
    metric.update(["the answer is 4"], ["4"])
    assert metric.compute() == pytest.approx(1 / 3)
    flexible = AnswerMatch("flexible")
    flexible.update(["#### 4", "#### 5", "the answer is 4"], ["4", "4", "4"])
    assert flexible.compute() == pytest.approx(2 / 3)
    metric.reset()
    metric.update(["#### 9"], ["9"])
    assert metric.compute() == torch.tensor(1.0)

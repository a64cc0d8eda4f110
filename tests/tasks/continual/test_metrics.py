"""Continual-learning metrics against values computed by hand (in the comments)."""

import numpy as np
import pytest

from lightning_moe.errors import UserInputError
from lightning_moe.tasks.continual.metrics import (
    average_incremental_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
    last_incremental_accuracy,
    mtil_avg,
    mtil_last,
    mtil_transfer,
    seen_class_accuracy,
    task_incremental_summary,
)

# a[i][j]: accuracy on task j after training tasks 0..i; one measured 0.0 above the diagonal
A = [
    [0.9, 0.2, 0.0],
    [0.7, 0.8, 0.1],
    [0.5, 0.6, 0.95],
]
ZERO_SHOT = [0.3, 0.25, 0.02]


def test_mtil_metrics_by_hand():
    # transfer: column 1 -> 0.2; column 2 -> (0.0 + 0.1) / 2 = 0.05; mean 0.125 (0.15 if the zero were masked)
    assert mtil_transfer(A) == pytest.approx(0.125)
    assert mtil_avg(A) == pytest.approx(4.75 / 9)  # all nine entries
    assert mtil_last(A) == pytest.approx(2.05 / 3)  # (0.5 + 0.6 + 0.95) / 3


def test_gem_and_chaudhry_metrics_by_hand():
    assert backward_transfer(A) == pytest.approx(-0.3)  # ((0.5 - 0.9) + (0.6 - 0.8)) / 2
    assert forward_transfer(A, ZERO_SHOT) == pytest.approx(0.015)  # ((0.2 - 0.25) + (0.1 - 0.02)) / 2
    assert forgetting(A) == pytest.approx(0.3)  # ((0.9 - 0.5) + (0.8 - 0.6)) / 2


def test_forgetting_takes_the_best_earlier_accuracy_even_before_the_task_was_trained():
    # task 1 was best zero-shot-like after task 0 (0.85), above its own training step (0.8)
    a = [[0.9, 0.85, 0.0], [0.7, 0.8, 0.1], [0.5, 0.6, 0.95]]
    assert forgetting(a) == pytest.approx(((0.9 - 0.5) + (0.85 - 0.6)) / 2)
    assert backward_transfer(a) == pytest.approx(-0.3)  # BWT compares with the diagonal only


def test_a_matrix_of_zeros_and_a_perfect_one():
    zeros, ones = np.zeros((3, 3)), np.ones((3, 3))
    assert mtil_transfer(zeros) == mtil_avg(zeros) == mtil_last(zeros) == 0.0
    assert forgetting(zeros) == backward_transfer(zeros) == 0.0
    assert forward_transfer(zeros, [0.5, 0.5, 0.5]) == pytest.approx(-0.5)
    assert mtil_transfer(ones) == mtil_last(ones) == 1.0 and forgetting(ones) == 0.0


def test_class_incremental_accuracy_weights_steps_by_test_images():
    # future steps score 0.0 in a class-incremental stream; they must not enter A_i
    a = [[0.9, 0.0, 0.0], [0.6, 0.8, 0.0], [0.5, 0.4, 0.7]]
    sizes = [100, 100, 200]
    # A_0 = 0.9; A_1 = (60 + 80) / 200 = 0.7; A_2 = (50 + 40 + 140) / 400 = 0.575
    np.testing.assert_allclose(seen_class_accuracy(a, sizes), [0.9, 0.7, 0.575])
    assert average_incremental_accuracy(a, sizes) == pytest.approx(2.175 / 3)
    assert last_incremental_accuracy(a, sizes) == pytest.approx(0.575)


def test_summary_holds_every_task_incremental_metric():
    summary = task_incremental_summary(A, ZERO_SHOT)
    assert summary["mtil_mean"] == pytest.approx((0.125 + 4.75 / 9 + 2.05 / 3) / 3)
    assert summary["bwt"] == pytest.approx(-0.3) and summary["fwt"] == pytest.approx(0.015)
    assert set(summary) == {"transfer", "avg", "last", "mtil_mean", "bwt", "fwt", "forgetting"}


@pytest.mark.parametrize("bad", [[[0.5]], [[0.5, 0.4]], [[0.5, 0.4], [0.3, 0.2], [0.1, 0.0]]])
def test_a_matrix_that_is_not_square_with_two_tasks_is_refused(bad):
    with pytest.raises(UserInputError, match="T x T with T >= 2 tasks"):
        mtil_avg(bad)


def test_mismatched_rows_are_refused():
    with pytest.raises(UserInputError, match=r"one accuracy per task \(3\)"):
        forward_transfer(A, [0.1, 0.2])
    with pytest.raises(UserInputError, match="one positive count per step"):
        seen_class_accuracy(A, [10, 0, 10])

"""Continual-learning metrics over an accuracy matrix, as the literature defines them.

Notation (0-based): T tasks in stream order; `a[i][j]` is the accuracy on task j after training
on tasks 0..i; `z[j]` is the accuracy on task j before any training (zero-shot CLIP). Accuracies
are fractions in [0, 1]. A real 0.0 is a measured accuracy and counts like any other value: no
metric masks zeros. Every function refuses a matrix that is not square T x T with T >= 2 (or the
`z` row of another length), because each formula needs at least two tasks.

MTIL (Zheng et al., 2023, "Preventing Zero-Shot Transfer Degradation in Continual Learning of
Vision-Language Models"):
- Transfer = mean over j = 1..T-1 of ( mean over i = 0..j-1 of a[i][j] ): accuracy on tasks not
  yet trained on (the upper triangle, column by column); higher is better.
- Avg = mean of all T x T entries.
- Last = mean of the final row a[T-1][.].

GEM (Lopez-Paz & Ranzato, 2017):
- BWT = mean over j = 0..T-2 of ( a[T-1][j] - a[j][j] ); negative means forgetting.
- FWT = mean over j = 1..T-1 of ( a[j-1][j] - z[j] ); here the reference z is zero-shot CLIP
  (GEM's is a randomly initialised model), so positive means training helped unseen tasks.

Chaudhry et al., 2018 (RWalk):
- Forgetting = mean over j = 0..T-2 of ( max over l = 0..T-2 of a[l][j] - a[T-1][j] ): the drop
  from the best accuracy reached on task j before the last task; >= 0 up to noise, lower is
  better. As in the paper, the max runs over every earlier step l, also those before task j.

Class-incremental (Rebuffi et al., 2017, iCaRL): after step i the model is tested on the classes
of steps 0..i together. With n[j] test images in step j's classes, that accuracy is
A_i = sum_{j<=i} n[j] a[i][j] / sum_{j<=i} n[j].
- Average incremental accuracy = mean over i of A_i.
- Last = A_{T-1}.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lightning_moe.errors import UserInputError

Matrix = Sequence[Sequence[float]] | np.ndarray


def as_matrix(accuracy: Matrix) -> np.ndarray:
    """The accuracy matrix as a float array, checked to be T x T with T >= 2."""
    a = np.asarray(accuracy, dtype=float)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 2:
        raise UserInputError(f"an accuracy matrix must be T x T with T >= 2 tasks, got shape {a.shape}")
    return a


def mtil_transfer(accuracy: Matrix) -> float:
    a = as_matrix(accuracy)
    return float(np.mean([a[:j, j].mean() for j in range(1, len(a))]))


def mtil_avg(accuracy: Matrix) -> float:
    return float(as_matrix(accuracy).mean())


def mtil_last(accuracy: Matrix) -> float:
    return float(as_matrix(accuracy)[-1].mean())


def backward_transfer(accuracy: Matrix) -> float:
    a = as_matrix(accuracy)
    return float(np.mean(a[-1, :-1] - np.diag(a)[:-1]))


def forward_transfer(accuracy: Matrix, zero_shot: Sequence[float]) -> float:
    a = as_matrix(accuracy)
    z = np.asarray(zero_shot, dtype=float)
    if z.shape != (len(a),):
        raise UserInputError(f"the zero-shot row needs one accuracy per task ({len(a)}), got shape {z.shape}")
    return float(np.mean([a[j - 1, j] - z[j] for j in range(1, len(a))]))


def forgetting(accuracy: Matrix) -> float:
    a = as_matrix(accuracy)
    return float(np.mean(a[:-1, :-1].max(axis=0) - a[-1, :-1]))


def seen_class_accuracy(accuracy: Matrix, test_sizes: Sequence[int]) -> np.ndarray:
    """A_i for every step i: the accuracy on all classes seen so far, weighted by test images."""
    a = as_matrix(accuracy)
    n = np.asarray(test_sizes, dtype=float)
    if n.shape != (len(a),) or (n <= 0).any():
        raise UserInputError(
            f"test_sizes needs one positive count per step ({len(a)}), got {list(test_sizes)}"
        )
    return np.array([(a[i, : i + 1] * n[: i + 1]).sum() / n[: i + 1].sum() for i in range(len(a))])


def average_incremental_accuracy(accuracy: Matrix, test_sizes: Sequence[int]) -> float:
    return float(seen_class_accuracy(accuracy, test_sizes).mean())


def last_incremental_accuracy(accuracy: Matrix, test_sizes: Sequence[int]) -> float:
    return float(seen_class_accuracy(accuracy, test_sizes)[-1])


def task_incremental_summary(accuracy: Matrix, zero_shot: Sequence[float]) -> dict[str, float]:
    """Every task-incremental metric of one run, by name (MTIL's "mean" averages its three)."""
    summary = {
        "transfer": mtil_transfer(accuracy),
        "avg": mtil_avg(accuracy),
        "last": mtil_last(accuracy),
    }
    summary["mtil_mean"] = float(np.mean(list(summary.values())))
    return summary | {
        "bwt": backward_transfer(accuracy),
        "fwt": forward_transfer(accuracy, zero_shot),
        "forgetting": forgetting(accuracy),
    }


def class_incremental_summary(accuracy: Matrix, test_sizes: Sequence[int]) -> dict[str, float]:
    """Every class-incremental metric of one run, by name."""
    return {
        "avg_incremental": average_incremental_accuracy(accuracy, test_sizes),
        "last_incremental": last_incremental_accuracy(accuracy, test_sizes),
        "bwt": backward_transfer(accuracy),
        "forgetting": forgetting(accuracy),
    }

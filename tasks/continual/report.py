"""What a continual run records (`ContinualRecord`: the zero-shot matrix, the accuracy matrix row
by row, what each continual adapter kept), how it is written and drawn, and the suite's table of
mean ± std over seeds."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from lightning_moe.figures import heatmap_figure
from lightning_moe.tasks.continual.metrics import class_incremental_summary, task_incremental_summary

RECORD_FILE = "accuracy_matrix.json"


@dataclass
class ContinualRecord:
    """One run over a stream. `zero_shot_matrix[i][j]`: task j before training, with the head
    used after task i; `matrix[i][j]`: task j after training tasks 0..i (rows so far);
    `kept[i]`: what each continual adapter kept at the end of task i (`end_task`)."""

    tasks: list[str]
    class_incremental: bool
    test_sizes: list[int]
    zero_shot_matrix: list[list[float]]
    matrix: list[list[float]] = field(default_factory=list)
    kept: list[dict] = field(default_factory=list)

    @property
    def zero_shot(self) -> list[float]:
        """z[j]: accuracy on task j before training, with the head task j is trained with."""
        return [self.zero_shot_matrix[j][j] for j in range(len(self.tasks))]

    @property
    def complete(self) -> bool:
        return len(self.matrix) == len(self.tasks)

    def add_row(self, row: list[float], kept: dict) -> None:
        self.matrix.append(list(row))
        self.kept.append(kept)

    def metrics(self, matrix: list[list[float]]) -> dict[str, float]:
        if self.class_incremental:
            return class_incremental_summary(matrix, self.test_sizes)
        return task_incremental_summary(matrix, self.zero_shot)

    def summary(self) -> dict[str, float] | None:
        """The metrics of the finished matrix (None until every task is trained)."""
        return self.metrics(self.matrix) if self.complete else None

    def zero_shot_summary(self) -> dict[str, float]:
        """The same metrics for zero-shot CLIP, the reference row of every table."""
        return self.metrics(self.zero_shot_matrix)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ContinualRecord:
        return cls(**data)

    def write(self, folder: Path) -> None:
        """accuracy_matrix.json (everything, with the summaries), accuracy_matrix.npy (the rows so
        far, [rows, T]) and zero_shot_matrix.npy ([T, T])."""
        folder.mkdir(parents=True, exist_ok=True)
        report = self.to_dict() | {
            "zero_shot": self.zero_shot,
            "summary": self.summary(),
            "zero_shot_summary": self.zero_shot_summary(),
        }
        (folder / RECORD_FILE).write_text(json.dumps(report, indent=1))
        np.save(
            folder / "accuracy_matrix.npy", np.array(self.matrix, dtype=float).reshape(-1, len(self.tasks))
        )
        np.save(folder / "zero_shot_matrix.npy", np.array(self.zero_shot_matrix, dtype=float))

    @classmethod
    def read(cls, folder: Path) -> ContinualRecord:
        report = json.loads((folder / RECORD_FILE).read_text())
        return cls(**{name: report[name] for name in cls.__dataclass_fields__})


def matrix_figure(record: ContinualRecord) -> Figure:
    """A heatmap: the zero-shot row, then one row per trained task; accuracies in percent."""
    rows = [record.zero_shot, *record.matrix]
    labels = ["zero-shot"] + [f"after {name}" for name in record.tasks[: len(record.matrix)]]
    return heatmap_figure(
        100 * np.array(rows),
        labels,
        list(record.tasks),
        "accuracy (%) on each task (columns) after training each task (rows)",
        "accuracy (%)",
        vmax=100.0,
        column_title="evaluated on",
    )


def mean_std_table(results: dict[str, list[dict[str, float]]]) -> tuple[str, str]:
    """(markdown, csv) of the mean ± std over seeds of every metric, one row per method; the
    values are percentages (std over seeds with ddof=0; "n" is the number of seeds)."""
    metrics = list(next(iter(results.values()))[0])
    header = ["method", "n", *metrics]
    markdown = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["method", "n"] + [f"{m}_{s}" for m in metrics for s in ("mean", "std")])
    for method, runs in results.items():
        values = 100 * np.array([[run[metric] for metric in metrics] for run in runs])
        mean, std = values.mean(axis=0), values.std(axis=0)
        cells = [f"{m:.1f} ± {s:.1f}" for m, s in zip(mean, std, strict=True)]
        markdown.append("| " + " | ".join([method, str(len(runs)), *cells]) + " |")
        writer.writerow(
            [method, len(runs)] + [f"{v:.4f}" for pair in zip(mean, std, strict=True) for v in pair]
        )
    return "\n".join(markdown) + "\n", buffer.getvalue()

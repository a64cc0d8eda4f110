"""Per-task accuracies of a finished suite, averaged over seeds: right after training each task
(the diagonal) and after the last task (the final row), and the ranks CoDyRA kept per task.

    .venv/bin/python scripts/continual_table.py runs/continual/suite
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from lightning_moe.tasks.continual.report import ContinualRecord


def main(suite: Path) -> None:
    runs = {
        folder.name: sorted(folder.glob("seed*")) for folder in sorted(suite.iterdir()) if folder.is_dir()
    }
    print("| method | right after training the task (diagonal) | after the last task (final row) |")
    print("|---|---|---|")
    for method, seeds in runs.items():
        records = [ContinualRecord.read(seed) for seed in seeds]
        matrix = 100 * np.mean([record.matrix for record in records], axis=0)
        zero_shot = 100 * np.mean([record.zero_shot for record in records], axis=0)
        if method == next(iter(runs)):
            row = " · ".join(f"{value:.1f}" for value in zero_shot)
            print(f"| zero-shot | {row} | {row} |")
        diagonal = " · ".join(f"{value:.1f}" for value in np.diag(matrix))
        final = " · ".join(f"{value:.1f}" for value in matrix[-1])
        print(f"| {method} | {diagonal} | {final} |")
        for task in range(len(records[0].tasks)):
            kept = [sum(record.kept[task]["codyra_ranks_kept"].values()) for record in records]
            if any(kept):
                print(f"  codyra ranks kept after task {task}, per seed: {kept}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))

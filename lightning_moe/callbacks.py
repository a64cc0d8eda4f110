"""Callbacks of the application shell."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from lightning_moe.errors import UserInputError
from lightning_moe.routing_logging import summary_line
from lightning_moe.task import TaskModule
from lightning_moe.tensorboard_views import add_text


def _run_folder(trainer: L.Trainer) -> Path:
    return Path(trainer.log_dir or trainer.default_root_dir)


class ExportAdapter(L.Callback):
    """At the end of `fit`, write what the task trained as a stand-alone folder (`TaskModule.export`):
    for adapter tasks adapter_config.json + adapter_model.safetensors, which `adapter_path` or
    `load_adapter` reads back.

    Args:
        dirpath: Target folder; default: "adapter" inside the run's log directory.
        base_model: Name recorded in the adapter config (informational).
    """

    def __init__(self, dirpath: str | None = None, base_model: str = "") -> None:
        self.dirpath = dirpath
        self.base_model = base_model

    def _target(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath or _run_folder(trainer) / "adapter")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # refuse before training, not after it: the export never replaces an adapter
        target = self._target(trainer)
        if stage == "fit" and target.is_dir() and any(target.iterdir()):
            raise UserInputError(
                f"{target} already holds an adapter; choose another run folder "
                "(e.g. --trainer.logger.init_args.version) or move the adapter away"
            )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, TaskModule):
            return
        if trainer.num_training_batches == 0:  # the data module did not say so itself
            raise UserInputError(
                "fit found no training batches, so nothing was trained and no adapter exported"
            )
        # every process takes part: a sharded model gathers its adapters before rank 0 writes
        folder = self._target(trainer)
        pl_module.export(str(folder), base_model=self.base_model)
        rank_zero_info(f"exported to {folder}")


class JsonlPredictionWriter(BasePredictionWriter):
    """Write what `predict_step` returns (lists of dicts) to a jsonl file, one record per line,
    and print the mean of every boolean field (e.g. the fraction of correct answers).

    Args:
        path: Output file; default: "predictions.jsonl" in the run's log directory. An existing
            file is never overwritten: the run stops before predicting.
    """

    def __init__(self, path: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.path = path

    def _target(self, trainer: L.Trainer) -> Path:
        return Path(self.path) if self.path else _run_folder(trainer) / "predictions.jsonl"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "predict" and self._target(trainer).exists():
            raise UserInputError(f"prediction file {self._target(trainer)} exists; choose another path")

    def write_on_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Sequence[Any], batch_indices
    ) -> None:
        self.write_records(trainer, [record for batch in predictions for record in batch])

    def write_records(self, trainer: L.Trainer, records: list[dict]) -> None:
        target = self._target(trainer)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        partial.write_text("".join(json.dumps(record) + "\n" for record in records))
        os.replace(partial, target)
        flags = sorted(
            {key for record in records for key, value in record.items() if isinstance(value, bool)}
        )
        means = ", ".join(f"{key} {sum(r[key] for r in records) / len(records):.3f}" for key in flags)
        rank_zero_info(f"{len(records)} predictions written to {target}" + (f" ({means})" if means else ""))


class BeforeAfterTable(L.Callback):
    """Evaluate before training and after it, and print the two side by side.

    "Before" is Lightning's sanity-check validation, made to cover the whole validation set; at
    that point fresh adapters are zero deltas, so it scores the base model. Those values also go
    to the logger at step 0. "After" is the last validation of the run. For a score that is a
    share of the n validation examples (its name has no "loss"), the table also gives the noise
    of the change: twice its standard error, sqrt(b(1-b)/n + a(1-a)/n) (unpaired, so an upper
    bound for the same examples scored twice). Under the table, one line sums up the routing of
    the last logged training step. The table goes to stdout, to `before_after.md` in the run's
    log directory and to TensorBoard's text tab.

    Args:
        metrics: Logged validation metrics to compare, e.g. ["val/strict_match", "val/loss"].
    """

    def __init__(self, metrics: list[str]) -> None:
        self.metrics = list(metrics)
        self.before: dict[str, float] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            trainer.num_sanity_val_steps = float("inf")  # the whole validation set

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        values = trainer.callback_metrics
        self.before = {name: float(values[name]) for name in self.metrics if name in values}
        if trainer.logger is not None and self.before:
            trainer.logger.log_metrics(self.before, step=0)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        after = {
            name: float(value) for name, value in trainer.callback_metrics.items() if name in self.metrics
        }
        examples = validation_examples(trainer)
        table = before_after_markdown(self.metrics, self.before, after, examples)
        routing = getattr(pl_module, "routing_summary", None)
        if routing is not None and routing[1] is not None:
            table += f"\n\n{summary_line(routing[1])} (training step {routing[0]})"
        print(f"\n{table}\n")
        folder = _run_folder(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "before_after.md").write_text(table + "\n")
        add_text(trainer.logger, "before_after", table, trainer.global_step)


def validation_examples(trainer: L.Trainer) -> int | None:
    """How many examples the validation data holds, when its datasets say."""
    loaders = trainer.val_dataloaders
    loaders = loaders if isinstance(loaders, list | tuple) else [loaders]
    try:
        return sum(len(loader.dataset) for loader in loaders)
    except (AttributeError, TypeError):
        return None


def before_after_markdown(
    metrics: list[str], before: dict[str, float], after: dict[str, float], examples: int | None
) -> str:
    header = f"| metric | before training | after training | change | noise (2 s.e., n={examples}) |"
    rows = [header, "|---|---:|---:|---:|---:|"]
    for name in metrics:
        first, last = before.get(name), after.get(name)
        cells = [f"{v:.4f}" if v is not None else "not measured" for v in (first, last)]
        change = noise = ""
        if first is not None and last is not None:
            change = f"{last - first:+.4f}"
            if examples and "loss" not in name and 0 <= first <= 1 and 0 <= last <= 1:
                spread = math.sqrt((first * (1 - first) + last * (1 - last)) / examples)
                noise = f"± {2 * spread:.4f}"
        rows.append(f"| {name} | {cells[0]} | {cells[1]} | {change} | {noise} |")
    return "\n".join(rows)

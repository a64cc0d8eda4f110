"""What a run shows in TensorBoard besides its scalars: a custom-scalars layout that groups the
charts (losses, routing, scores, and each task's own), the run's config as text, and helpers
for text tables.

`TensorBoardViews` is added to every run by the CLI; with another logger it does nothing.
"""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

_LOSSES = "(loss|task_loss|balance_loss|z_loss|gate_label_loss)"
# category -> chart title -> tag regexes (TensorBoard searches each regex in every tag). A task
# adds its own categories with `TaskModule.tensorboard_layout()`.
LAYOUT: dict[str, dict[str, list[str]]] = {
    "losses": {
        "training loss (task plus router terms)": [r"train/loss$"],
        "training task loss": [r"train/task_loss$"],
        "validation loss": [r"val/loss$"],
        "load-balance loss (1 = balanced)": [r"train/balance_loss$"],
        "router z-loss": [r"train/z_loss$"],
        "gate label loss (MeteoRA)": [r"train/gate_label_loss$"],
    },
    "routing": {
        "router entropy (1 = uniform, 0 = certain)": [r"routing/entropy$"],
        "busiest expert / its fair share (1 = balanced)": [r"routing/max_load$"],
        "experts that got no token (all layers)": [r"routing/dead_experts$"],
    },
    "scores": {"validation": [rf"^val/(?!{_LOSSES}$).+"]},
}


def charts_for(layout: dict[str, dict[str, list[str]]], tags: list[str]) -> dict[str, dict[str, list[str]]]:
    """`layout` without the charts whose regexes match none of `tags`, the metrics of the first
    training step. Charts of validation tags (patterns starting `val/`) stay: those tags appear
    only after the first validation."""
    kept = {}
    for category, charts in layout.items():
        shown = {
            title: patterns
            for title, patterns in charts.items()
            if any(
                p.lstrip("^").startswith("val/") or any(re.search(p, tag) for tag in tags) for p in patterns
            )
        }
        if shown:
            kept[category] = shown
    return kept


def custom_scalars(layout: dict[str, dict[str, list[str]]]) -> dict:
    """LAYOUT in the form `SummaryWriter.add_custom_scalars` takes: every chart is a multiline
    chart of the tags its regexes match."""
    return {
        category: {title: ["Multiline", patterns] for title, patterns in charts.items()}
        for category, charts in layout.items()
    }


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    def cell(value: object) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ⏎ ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def as_code(text: str) -> str:
    """Text TensorBoard shows verbatim (its markdown keeps four-space-indented blocks as code)."""
    return "\n".join("    " + line for line in text.splitlines())


@rank_zero_only
def add_text(logger: object, tag: str, markdown: str, step: int) -> None:
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_text(tag, markdown, step)


class TensorBoardViews(L.Callback):
    """Writes the run's config.yaml as text when a fit starts, and after the first training step
    the custom-scalars layout: LAYOUT plus the task's own categories, without the charts that
    run logs nothing for."""

    def __init__(self, layout: dict[str, dict[str, list[str]]] | None = None) -> None:
        self.layout = layout if layout is not None else LAYOUT
        self.written = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = trainer.logger
        if trainer.is_global_zero and isinstance(logger, TensorBoardLogger):
            config = Path(logger.log_dir) / "config.yaml"
            if config.is_file():
                logger.experiment.add_text("config", as_code(config.read_text()), trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        logger = trainer.logger
        if self.written or not (trainer.is_global_zero and isinstance(logger, TensorBoardLogger)):
            return
        own = pl_module.tensorboard_layout() if hasattr(pl_module, "tensorboard_layout") else {}
        layout = charts_for(self.layout, list(trainer.callback_metrics)) | own
        logger.experiment.add_custom_scalars(custom_scalars(layout))
        self.written = True

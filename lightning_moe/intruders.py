"""`python -m lightning_moe inspect intruders ADAPTER_DIR`: intruder dimensions of a trained adapter.

"LoRA vs Full Fine-tuning: An Illusion of Equivalence" (Shuttleworth et al., 2024): a singular
vector of the fine-tuned W + dW is an intruder when it is far from every singular vector of the
base W. For each adapted layer, and each expert of a mixture (W + dW_e), this counts the left
singular vectors among the top `k` of W + dW whose largest |cosine| with any left singular vector
of W is below `epsilon` (peft's `intruders` takes the same definition). Output: a markdown table
(layers x experts), and with `--logdir` a TensorBoard histogram of the counts and a
layers x experts heatmap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from jsonargparse import ArgumentParser
from torch import Tensor

from lightning_moe.adapted_task import adapted_task
from lightning_moe.adapters import adapted_layers
from lightning_moe.adapters.moe import ExpertBank
from lightning_moe.errors import UserInputError
from lightning_moe.figures import heatmap_figure
from lightning_moe.routing_logging import short_names
from lightning_moe.tensorboard_views import markdown_table


@torch.no_grad()
def intruder_count(weight: Tensor, delta: Tensor, top_k: int = 10, epsilon: float = 0.5) -> int:
    """How many of the top-k left singular vectors of weight + delta have max |cos| < epsilon
    with every left singular vector of weight."""
    base_u = torch.linalg.svd(weight.double(), full_matrices=False)[0]
    tuned_u = torch.linalg.svd((weight + delta).double(), full_matrices=False)[0][:, :top_k]
    similarity = (tuned_u.T @ base_u).abs().amax(dim=1)
    return int((similarity < epsilon).sum())


def layer_updates(adapter) -> dict[str, Tensor]:
    """The dense update(s) of one adapter: one per expert of a LoRA-expert bank, else its one
    merged update; {} for kinds whose update depends on the input without a per-expert form."""
    for module in adapter.modules():
        if isinstance(module, ExpertBank):
            updates = module.scaling * module.lora_B.detach() @ module.lora_A.detach()
            return {f"expert {e}": update for e, update in enumerate(updates)}
    return {"update": adapter.delta_weight()} if adapter.mergeable else {}


def intruder_table(model, top_k: int = 10, epsilon: float = 0.5) -> dict[str, dict[str, int]]:
    """{layer: {column (update or expert e): intruder count}} of every adapted layer."""
    table = {}
    for name, layer in adapted_layers(model):
        weight = layer.base_layer.weight.detach()
        updates = layer_updates(layer.adapter)
        if updates:
            table[name] = {
                column: intruder_count(weight, delta.to(weight.dtype), top_k, epsilon)
                for column, delta in updates.items()
            }
    if not table:
        raise UserInputError(
            "no adapted layer has a dense update to compare (routed kinds other than LoRA experts)"
        )
    return table


def report_markdown(table: dict[str, dict[str, int]], top_k: int, epsilon: float) -> str:
    columns = sorted({column for row in table.values() for column in row}, key=_column_order)
    rows = [
        [name, *(row.get(column, "") for column in columns), sum(row.values())] for name, row in table.items()
    ]
    total = sum(sum(row.values()) for row in table.values())
    cells = sum(len(row) for row in table.values())
    header = f"Intruder dimensions (top {top_k} singular vectors, max |cos| < {epsilon}): {total} in {cells} updates\n\n"
    return header + markdown_table(["layer", *columns, "total"], rows)


def _column_order(column: str) -> tuple[int, int]:
    return (0, int(column.split()[-1])) if column.startswith("expert") else (-1, 0)


def log_to_tensorboard(table: dict[str, dict[str, int]], logdir: str, markdown: str) -> None:
    from torch.utils.tensorboard import SummaryWriter

    columns = sorted({column for row in table.values() for column in row}, key=_column_order)
    values = np.array(
        [[row.get(column, np.nan) for column in columns] for row in table.values()], dtype=float
    )
    with SummaryWriter(logdir) as writer:
        writer.add_histogram("intruders/count", values[~np.isnan(values)], 0)
        figure = heatmap_figure(values, short_names(list(table)), columns, "intruder dimensions", "count")
        writer.add_figure("intruders/layers_by_expert", figure, 0)
        writer.add_text("intruders/report", markdown, 0)


def main(args: list[str] | None = None) -> dict[str, Any]:
    """count intruder dimensions of a trained adapter's layers and experts against its base"""
    parser = ArgumentParser(prog="python -m lightning_moe inspect intruders", description=__doc__)
    parser.add_argument("adapter_dir", type=str, help="A saved adapter folder.")
    parser.add_argument(
        "--base", nargs="+", default=None, help="Fit config(s) of the base (default: the run's config.yaml)."
    )
    parser.add_argument("--top_k", type=int, default=10, help="Singular vectors of W + dW compared.")
    parser.add_argument(
        "--epsilon", type=float, default=0.5, help="Below this max |cosine| a vector is an intruder."
    )
    parser.add_argument(
        "--output", type=str, default=None, help="Also write the markdown report to this file."
    )
    parser.add_argument(
        "--logdir", type=str, default=None, help="Write the TensorBoard histogram and heatmap here."
    )
    settings = parser.parse_args(args)
    if settings.top_k < 1 or not 0 < settings.epsilon <= 1:
        raise UserInputError(
            f"--top_k must be >= 1 and --epsilon in (0, 1], got {settings.top_k} and {settings.epsilon}"
        )
    folder = Path(settings.adapter_dir)
    configs = settings.base or [str(folder.parent / "config.yaml")]
    if not Path(configs[0]).is_file():
        raise UserInputError(f"intruders needs --base CONFIG: there is no run config at {configs[0]}")
    task, _ = adapted_task(folder, configs)
    table = intruder_table(task.model, settings.top_k, settings.epsilon)
    markdown = report_markdown(table, settings.top_k, settings.epsilon)
    print(markdown)
    if settings.output:
        Path(settings.output).write_text(markdown + "\n")
    if settings.logdir:
        log_to_tensorboard(table, settings.logdir, markdown)
    return {"table": table, "markdown": markdown}

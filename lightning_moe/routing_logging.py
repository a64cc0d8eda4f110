"""Routing statistics to the logger, summary first.

Three scalars sum up a step's routing over every routed layer: `routing/entropy` (the router
distribution's mean entropy divided by log E, so 1 is uniform and 0 is certain), `routing/max_load`
(the busiest expert's share of its layer's assignments times E, so 1 is balanced and E is one
expert taking everything) and `routing/dead_experts` (experts that got no token, over all layers).
The per-layer detail goes to TensorBoard as one labelled layers x experts heatmap and two
histograms over layers, not as scalars per layer.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure

from lightning_moe.adapters.aux_losses import LayerRoutingStats
from lightning_moe.adapters.routing import RoutingRecord
from lightning_moe.figures import draw_heatmap, heatmap_figure


def normalised_entropy(stats: LayerRoutingStats) -> float:
    experts = len(stats.load)
    return stats.entropy / math.log(experts) if experts > 1 else 0.0


def max_load(stats: LayerRoutingStats) -> float:
    return float(stats.load.max()) * len(stats.load)


def routing_summary(stats: Mapping[str, LayerRoutingStats]) -> dict[str, float]:
    """The three summary numbers of the module docstring, plus the number of experts in all."""
    layers = list(stats.values())
    return {
        "entropy": sum(map(normalised_entropy, layers)) / len(layers),
        "max_load": max(map(max_load, layers)),
        "dead_experts": float(sum(s.dead_experts for s in layers)),
        "experts": float(sum(len(s.load) for s in layers)),
    }


def summary_line(summary: Mapping[str, float]) -> str:
    return (
        f"routing: entropy {summary['entropy']:.2f} of uniform, busiest expert {summary['max_load']:.2f}x "
        f"its fair share, {summary['dead_experts']:.0f} of {summary['experts']:.0f} experts got no token"
    )


def short_names(names: list[str]) -> list[str]:
    """Layer names without the dotted prefix they all share ("model.layers.")."""
    parts = [name.split(".") for name in names]
    shared = 0
    while len(names) > 1 and all(len(p) > shared + 1 and p[shared] == parts[0][shared] for p in parts):
        shared += 1
    return [".".join(p[shared:]) for p in parts]


BLOCK = re.compile(r"^(.*?\d+)\.(.+)$")  # "model.layers.12.mlp.up_proj" -> ("model.layers.12", "mlp.up_proj")


def block_grid(names: list[str]) -> tuple[list[str], list[str], dict[str, tuple[int, int]]]:
    """Rows (blocks: the name up to its first number), columns (roles: the rest, e.g.
    "mlp.up_proj") and each layer's (row, column), so 30 blocks x 3 projections read as a
    30-row grid instead of 90 rows."""
    rows, roles, place = [], [], {}
    for name in names:
        match = BLOCK.match(name)
        block, role = (match.group(1), match.group(2)) if match else (name, "")
        rows += [block] if block not in rows else []
        roles += [role] if role not in roles else []
        place[name] = (rows.index(block), roles.index(role))
    return rows, roles, place


def load_figure(stats: Mapping[str, LayerRoutingStats], step: int) -> Figure:
    """Left: each layer's share of assignments per expert (%), blocks down, (role, expert)
    across. Right: each layer's router entropy / log E (1 = uniform)."""
    rows, roles, place = block_grid(list(stats))
    experts = max(len(s.load) for s in stats.values())
    load = np.full((len(rows), len(roles) * experts), np.nan)
    entropy = np.full((len(rows), len(roles)), np.nan)
    for name, layer in stats.items():
        row, role = place[name]
        load[row, role * experts : role * experts + len(layer.load)] = 100 * layer.load.numpy()
        entropy[row, role] = normalised_entropy(layer)
    height = min(2.2 + 0.24 * len(rows), 30.0)
    width = min(4.5 + 0.42 * load.shape[1] + 0.55 * len(roles), 16.0)
    figure = Figure(figsize=(width, height), layout="constrained")
    left, right = figure.subplots(1, 2, width_ratios=[load.shape[1] + 2, len(roles) + 2])
    row_names = short_names(rows)
    fair = f"fair share {100 / experts:.0f}%"
    draw_heatmap(left, load, row_names, [str(e % experts) for e in range(load.shape[1])],
                 f"expert load per layer at step {step} ({fair})", "share of the layer's tokens (%)",
                 column_title="expert")  # fmt: skip
    role_names = [role.split(".")[-1] or "layer" for role in roles]
    if len(roles) > 1:  # name each group of expert columns by its projection
        top = left.secondary_xaxis("top")
        top.set_xticks([r * experts + (experts - 1) / 2 for r in range(len(roles))], role_names)
        for boundary in range(1, len(roles)):
            left.axvline(boundary * experts - 0.5, color="white", linewidth=2)
    draw_heatmap(right, entropy, row_names, role_names, "router entropy / log E", "1 = uniform, 0 = certain",
                 vmax=1.0, cell_format="{:.2f}")  # fmt: skip
    left.set_ylabel("block")
    return figure


def log_routing_statistics(
    module: L.LightningModule, stats: Mapping[str, LayerRoutingStats], stage: str
) -> dict[str, float] | None:
    """Log the summary scalars, the per-layer histograms and the load figure; returns the summary."""
    if not stats:
        return None
    summary = routing_summary(stats)
    step = module.global_step
    scalars = {f"routing/{name}": summary[name] for name in ("entropy", "max_load", "dead_experts")}
    for logger in module.loggers:
        # at this step only: `module.log` would repeat the value at every step until the next
        # one, drawing a staircase of stale values between the steps that measured routing
        logger.log_metrics(scalars, step)
    logger = module.logger
    if isinstance(logger, TensorBoardLogger):
        layers = list(stats.values())
        logger.experiment.add_histogram(
            "routing/layer_entropy", np.array([normalised_entropy(s) for s in layers]), step
        )
        logger.experiment.add_histogram(
            "routing/layer_max_load", np.array([max_load(s) for s in layers]), step
        )
        logger.experiment.add_figure(f"{stage}/expert_load", load_figure(stats, step), step)
    return summary


def mutual_information(counts: torch.Tensor) -> float:
    """I(group; expert) in bits from a [groups, experts] table of assignment counts (0 when the
    experts' choice says nothing about the group; at most log2 of the group count)."""
    total = counts.sum()
    if total <= 0:
        return 0.0
    joint = counts.double() / total
    independent = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
    seen = joint > 0
    return float((joint[seen] * (joint[seen] / independent[seen]).log2()).sum())


class GroupRouting:
    """Which experts each group's tokens go to over an evaluation epoch, per routed layer.

    A group is a sample's domain or a token's modality. Logged at the epoch's end:
    - `<stage>/<share_scalar>/<group>/<expert>`: each group's share of all its assignments (every
      routed layer, every real token), and the groups x experts heatmap `<stage>/<what>_expert_share`;
    - the mutual information between group and chosen expert, per layer (`mutual_information`):
      scalars `<stage>/<what>_expert_mi/mean` and `/max`, and a blocks x projections heatmap
      `<stage>/<what>_expert_mi`. The per-layer values also go to `<log dir>/<stage>_<what>_routing.json`.
    """

    def __init__(self, what: str, share_scalar: str = "expert_share") -> None:
        self.what = what
        self.share_scalar = share_scalar
        self.groups: list[str] = []
        self.counts: dict[str, torch.Tensor] = {}  # layer -> [groups seen so far, experts]

    @torch.no_grad()
    def update(
        self, records: Mapping[str, RoutingRecord], mask: torch.Tensor, labels: torch.Tensor, names: list[str]
    ) -> None:
        """labels: [batch, tokens] indices into `names`, the group of every token (mask selects real ones)."""
        real = mask.bool().cpu()
        real_labels = labels.cpu()[real]
        for index in sorted(set(real_labels.tolist())):  # groups appear once they have a real token
            if names[index] not in self.groups:
                self.groups.append(names[index])
        column = torch.tensor([self.groups.index(n) if n in self.groups else -1 for n in names])
        group = column[real_labels]  # [real tokens]
        for layer, record in records.items():
            if record.indices.dim() != 3:  # [batch, tokens, k] only
                continue
            experts = record.num_experts
            chosen = record.indices.cpu()[real]  # [real tokens, k]
            pairs = group[:, None] * experts + chosen
            table = torch.bincount(pairs.flatten(), minlength=len(self.groups) * experts)
            table = table.view(len(self.groups), experts).float()
            previous = self.counts.get(layer)
            if previous is not None:
                table[: previous.shape[0]] += previous
            self.counts[layer] = table

    def layer_information(self) -> dict[str, float]:
        return {layer: mutual_information(counts) for layer, counts in self.counts.items()}

    def log(self, module: L.LightningModule, stage: str) -> dict[str, float]:
        """Log the epoch's shares and mutual information (see the class docstring); returns the
        per-layer mutual information, then forgets the epoch."""
        if not self.counts:
            return {}
        counts = [c for c in self.counts.values() if c.shape[1] == next(iter(self.counts.values())).shape[1]]
        total = torch.zeros_like(counts[0])
        for layer_counts in counts:
            total[: layer_counts.shape[0]] += layer_counts
        shares = total / total.sum(dim=1, keepdim=True).clamp_min(1.0)
        order = sorted(range(len(self.groups)), key=lambda g: self.groups[g])
        information = self.layer_information()
        for g in order:
            for expert, share in enumerate(shares[g].tolist()):
                module.log(f"{stage}/{self.share_scalar}/{self.groups[g]}/{expert}", share)
        module.log(f"{stage}/{self.what}_expert_mi/mean", sum(information.values()) / len(information))
        module.log(f"{stage}/{self.what}_expert_mi/max", max(information.values()))
        logger = module.logger
        if isinstance(logger, TensorBoardLogger):
            figure = heatmap_figure(
                100 * shares[order].numpy(),
                [self.groups[g] for g in order],
                [str(e) for e in range(shares.shape[1])],
                f"where each {self.what}'s tokens go (all routed layers)",
                f"share of the {self.what}'s assignments (%)",
                column_title="expert",
            )
            logger.experiment.add_figure(f"{stage}/{self.what}_expert_share", figure, module.global_step)
            logger.experiment.add_figure(
                f"{stage}/{self.what}_expert_mi",
                information_figure(information, self.what, len(self.groups)),
                module.global_step,
            )
        if logger is not None and logger.log_dir and module.global_rank == 0:
            record = {
                "groups": self.groups,
                "layers": {
                    layer: {
                        "mutual_information_bits": information[layer],
                        "counts": self.counts[layer].tolist(),
                    }
                    for layer in self.counts
                },
            }
            path = Path(logger.log_dir) / f"{stage}_{self.what}_routing.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=1))
        self.groups, self.counts = [], {}
        return information


def information_figure(information: Mapping[str, float], what: str, groups: int) -> Figure:
    """The mutual information of every routed layer as blocks down, projections across, on a
    colour scale up to its maximum, log2(groups), so runs compare at a glance."""
    rows, roles, place = block_grid(list(information))
    values = np.full((len(rows), len(roles)), np.nan)
    for layer, bits in information.items():
        values[place[layer]] = bits
    return heatmap_figure(
        values,
        short_names(rows),
        [role.split(".")[-1] or "layer" for role in roles],
        f"mutual information between {what} and chosen expert",
        f"bits (at most {math.log2(max(groups, 2)):.2f})",
        vmax=math.log2(max(groups, 2)),
        cell_format="{:.2f}",
    )

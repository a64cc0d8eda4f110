"""Routing statistics to the logger, summary first.

Three scalars sum up a step's routing over every routed layer: `routing/entropy` (the router
distribution's mean entropy divided by log E, so 1 is uniform and 0 is certain), `routing/max_load`
(the busiest expert's share of its layer's assignments times E, so 1 is balanced and E is one
expert taking everything) and `routing/dead_experts` (experts that got no token, over all layers).
The per-layer detail goes to TensorBoard as one labelled layers x experts heatmap and two
histograms over layers, not as scalars per layer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

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


class DomainRouting:
    """Which experts each domain's tokens go to over an evaluation epoch: per domain, the share of
    all routing assignments (every routed layer, every real token) that each expert received.
    Logged as `<stage>/expert_share/<domain>/<expert>` scalars and a labelled domains x experts
    heatmap `<stage>/domain_expert_share`."""

    def __init__(self) -> None:
        self.counts: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def update(self, records: Mapping[str, RoutingRecord], mask: torch.Tensor, domains: list[str]) -> None:
        records = [r for r in records.values() if r.indices.dim() == 3]  # [batch, tokens, k]
        if not records:
            return
        experts = records[0].num_experts
        for record in records:
            if record.num_experts != experts:
                continue
            assigned = torch.nn.functional.one_hot(record.indices, experts).sum(dim=-2).float()
            per_sample = (assigned * mask[..., None].to(assigned)).sum(dim=1).cpu()
            for row, domain in enumerate(domains):
                self.counts[domain] = self.counts.get(domain, torch.zeros(experts)) + per_sample[row]

    def log(self, module: L.LightningModule, stage: str) -> None:
        if not self.counts:
            return
        domains = sorted(self.counts)
        shares = torch.stack([self.counts[d] / self.counts[d].sum().clamp_min(1.0) for d in domains])
        for domain, row in zip(domains, shares, strict=True):
            for expert, share in enumerate(row.tolist()):
                module.log(f"{stage}/expert_share/{domain}/{expert}", share)
        if isinstance(module.logger, TensorBoardLogger):
            figure = heatmap_figure(
                100 * shares.numpy(),
                domains,
                [str(e) for e in range(shares.shape[1])],
                "where each domain's tokens go (all routed layers)",
                "share of the domain's assignments (%)",
                column_title="expert",
            )
            module.logger.experiment.add_figure(f"{stage}/domain_expert_share", figure, module.global_step)
        self.counts = {}

"""Routing statistics to the logger: scalars through `LightningModule.log`, and for TensorBoard
a histogram of the chosen expert ids per layer plus a layers x experts load heatmap."""

from __future__ import annotations

from collections.abc import Mapping

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_moe.adapters.aux_losses import LayerRoutingStats
from lightning_moe.adapters.routing import RoutingRecord


def heatmap(loads: torch.Tensor) -> torch.Tensor:
    """[rows, experts] loads -> [3, rows, experts] image in [0, 1]: white is idle, dark red busy."""
    scaled = loads / loads.max().clamp_min(1e-8)
    return torch.stack([1.0 - 0.3 * scaled, 1.0 - scaled, 1.0 - scaled])


def load_heatmap(stats: Mapping[str, LayerRoutingStats]) -> torch.Tensor:
    """The layers x experts load image."""
    return heatmap(torch.stack([s.load for s in stats.values()]))


class DomainRouting:
    """Which experts each domain's tokens go to over an evaluation epoch: per domain, the share of
    all routing assignments (every routed layer, every real token) that each expert received.
    Logged as `<stage>/expert_share/<domain>/<expert>` scalars and a domains x experts image."""

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
            module.logger.experiment.add_image(
                f"{stage}/domain_expert_share", heatmap(shares), module.global_step, dataformats="CHW"
            )
        self.counts = {}


def log_routing_statistics(
    module: L.LightningModule,
    stats: Mapping[str, LayerRoutingStats],
    records: Mapping[str, RoutingRecord],
    stage: str,
) -> None:
    if not stats:
        return
    for layer, layer_stats in stats.items():
        module.log(f"routing/{layer}/entropy", layer_stats.entropy)
        module.log(f"routing/{layer}/dead_experts", float(layer_stats.dead_experts))
    module.log(f"{stage}/router_entropy", sum(s.entropy for s in stats.values()) / len(stats))
    module.log(f"{stage}/dead_experts", float(sum(s.dead_experts for s in stats.values())))
    logger = module.logger
    if isinstance(logger, TensorBoardLogger):
        step = module.global_step
        for layer, record in records.items():
            logger.experiment.add_histogram(
                f"routing_experts/{layer}",
                record.indices.detach().flatten().cpu(),
                step,
                bins=record.num_experts,
            )
        logger.experiment.add_image(f"{stage}/expert_load", load_heatmap(stats), step, dataformats="CHW")

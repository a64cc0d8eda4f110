"""Routing statistics to the logger: scalars through `LightningModule.log`, and for TensorBoard
a histogram of the chosen expert ids per layer plus a layers x experts load heatmap."""

from __future__ import annotations

from collections.abc import Mapping

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_moe.adapters.aux_losses import LayerRoutingStats
from lightning_moe.adapters.routing import RoutingRecord


def load_heatmap(stats: Mapping[str, LayerRoutingStats]) -> torch.Tensor:
    """[3, layers, experts] image in [0, 1]: white is an idle expert, dark red a busy one."""
    loads = torch.stack([s.load for s in stats.values()])
    scaled = loads / loads.max().clamp_min(1e-8)
    return torch.stack([1.0 - 0.3 * scaled, 1.0 - scaled, 1.0 - scaled])


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

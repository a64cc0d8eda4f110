"""kind `dylora`: DyLoRA (Valipour et al., 2023), one LoRA trained for every rank b <= r.

Each training step samples one b for the whole model (`sample_active_ranks`, a function of the
step, so a resumed run draws the same); the layer computes scaling(b) * B[:, :b] @ A[:b] @ x with
scaling(b) = alpha / b (alpha / sqrt(b) with rsLoRA). With `train_lower_ranks: false` (the
paper's "frozen" mode) ranks below b enter detached, so only the b-th row of A and column of B
learn that step. Evaluation uses `eval_rank` (default r). Because the first b ranks are a LoRA of
rank b on their own, `truncate_factors` cuts any rank out of a trained adapter exactly; the
`truncate` command writes it as a plain-LoRA folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .adapter_folder import CONFIG_FILE, WEIGHTS_FILE, read_adapter_config, read_rules, read_weights
from .base import register_adapter
from .errors import AdapterCheckpointError, AdapterConfigError
from .files import write_folder_files
from .inject import adapted_layers
from .lora import LoraAdapter, LoraConfig
from .rules import AdapterRule


@dataclass
class DyLoraConfig(LoraConfig):
    """DyLoRA: a nested-rank LoRA; every rank from `min_rank` to `rank` is trained and usable.

    Args:
        rank, alpha, dropout, use_rslora: As in LoraConfig; scaling at rank b is alpha / b.
        init: "kaiming" or "gaussian" (A random, B = 0).
        min_rank: The smallest rank sampled in training.
        rank_distribution: How b is drawn each step: "uniform" on [min_rank, rank] (the
            paper's), or "geometric" (P(b) proportional to 2^-(b - min_rank): small ranks
            more often, so they are trained more).
        train_lower_ranks: True: all of the first b ranks learn each step; False: only the b-th
            (the paper's "frozen" mode).
        eval_rank: The rank used outside training (None: rank).
    """

    kind: ClassVar[str] = "dylora"
    min_rank: int = 1
    rank_distribution: Literal["uniform", "geometric"] = "uniform"
    train_lower_ranks: bool = False
    eval_rank: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.allow_inits("DyLoRA's nested ranks", "kaiming", "gaussian")
        if not 1 <= self.min_rank <= self.rank:
            raise AdapterConfigError(
                f"min_rank must be in [1, rank={self.rank}], got min_rank={self.min_rank}"
            )
        if self.eval_rank is not None and not 1 <= self.eval_rank <= self.rank:
            raise AdapterConfigError(
                f"eval_rank must be in [1, rank={self.rank}], got eval_rank={self.eval_rank}"
            )

    def scaling_at(self, rank: int) -> float:
        return self.alpha / (rank**0.5 if self.use_rslora else rank)

    def rank_for(self, draw: float) -> int:
        """The rank a uniform draw in [0, 1) maps to under `rank_distribution` (inverse CDF)."""
        ranks = torch.arange(self.min_rank, self.rank + 1, dtype=torch.float64)
        weights = (
            torch.ones_like(ranks) if self.rank_distribution == "uniform" else 0.5 ** (ranks - self.min_rank)
        )
        cumulative = (weights / weights.sum()).cumsum(0)
        return int(
            ranks[
                int(
                    torch.searchsorted(cumulative, torch.tensor(draw, dtype=torch.float64), right=True).clamp(
                        max=len(ranks) - 1
                    )
                )
            ]
        )


@register_adapter
class DyLoraAdapter(LoraAdapter):
    """A plain LoRA of rank r whose forward uses the first `active_rank` ranks (see the module docstring)."""

    config_class = DyLoraConfig
    low_rank_factors = None  # its rank and scaling change every step: no fixed pair for LoRA-Pro

    def __init__(self, base_layer: nn.Linear, config: DyLoraConfig) -> None:
        super().__init__(base_layer, config)
        self.active_rank = config.rank  # set each training step by sample_active_ranks
        self.eval_rank = config.eval_rank or config.rank  # set_eval_rank changes it (not the shared config)

    def current_rank(self) -> int:
        return self.active_rank if self.training else self.eval_rank

    def forward(self, x: Tensor) -> Tensor:
        rank = self.current_rank()
        lora_A, lora_B = self.lora_A[:rank], self.lora_B[:, :rank]
        if self.training and not self.config.train_lower_ranks and rank > 1:
            lora_A = torch.cat([lora_A[: rank - 1].detach(), lora_A[rank - 1 :]])
            lora_B = torch.cat([lora_B[:, : rank - 1].detach(), lora_B[:, rank - 1 :]], dim=1)
        x = self.dropout(x.to(lora_A.dtype))
        return F.linear(F.linear(x, lora_A), lora_B) * self.config.scaling_at(rank)

    def factors(self) -> tuple[Tensor, Tensor]:
        """(A, B) of the rank in use, with `scaling` * B @ A its update (B carries the ratio of
        the rank's scaling to the configured one), so merges and exports see that rank."""
        lora_A, lora_B, scaling = truncate_factors(self, self.current_rank())
        return lora_A, lora_B * (scaling / self.scaling)


def truncate_factors(adapter: DyLoraAdapter, rank: int) -> tuple[Tensor, Tensor, float]:
    """(A [b, in], B [out, b], scaling) of the rank-`rank` LoRA inside a DyLoRA adapter."""
    if not 1 <= rank <= adapter.config.rank:
        raise AdapterConfigError(
            f"rank {rank} is outside this DyLoRA adapter's ranks 1..{adapter.config.rank}"
        )
    return adapter.lora_A[:rank].detach(), adapter.lora_B[:, :rank].detach(), adapter.config.scaling_at(rank)


def sample_active_ranks(model: nn.Module, seed: int, step: int) -> int | None:
    """Draw this step's rank for every DyLoRA layer from one uniform number, a function of
    (seed, step) only; returns the first layer's rank (None without DyLoRA layers)."""
    layers = [layer.adapter for _, layer in adapted_layers(model) if isinstance(layer.adapter, DyLoraAdapter)]
    if not layers:
        return None
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    draw = float(torch.rand((), generator=generator, dtype=torch.float64))
    for adapter in layers:
        adapter.active_rank = adapter.config.rank_for(draw)
    return layers[0].active_rank


def set_eval_rank(model: nn.Module, rank: int | None) -> None:
    """Evaluate every DyLoRA layer at `rank` (None: each layer's configured eval_rank)."""
    for name, layer in adapted_layers(model):
        if isinstance(layer.adapter, DyLoraAdapter):
            config = layer.adapter.config
            if rank is not None and not 1 <= rank <= config.rank:
                raise AdapterConfigError(
                    f"rank {rank} is outside the ranks 1..{config.rank} of DyLoRA layer {name!r}"
                )
            layer.adapter.eval_rank = rank or config.eval_rank or config.rank


def dylora_ranks(model: nn.Module) -> list[int]:
    """The ranks every DyLoRA layer of the model can be evaluated at (1..the smallest r)."""
    ranks = [
        layer.adapter.config.rank
        for _, layer in adapted_layers(model)
        if isinstance(layer.adapter, DyLoraAdapter)
    ]
    return list(range(1, min(ranks) + 1)) if ranks else []


def truncate_folder(source: str | Path, rank: int, output: str | Path, overwrite: bool = False) -> Path:
    """Write the rank-`rank` plain LoRA inside a saved DyLoRA adapter folder as its own adapter
    folder (other kinds' layers are copied as they are); exact: it computes what the DyLoRA
    layers compute at that rank."""
    source = Path(source)
    config = read_adapter_config(source)
    rules = read_rules(source, config)
    if not any(isinstance(rule.config, DyLoraConfig) for rule in rules):
        raise AdapterCheckpointError(
            f"{source} has no DyLoRA layers to truncate (its kinds: {sorted({r.config.kind for r in rules})})"
        )
    tensors = read_weights(source)
    new_rules, modules = [], dict(config.get("modules", {}))
    for rule in rules:
        if not isinstance(rule.config, DyLoraConfig):
            new_rules.append(rule)
            continue
        dy = rule.config
        if not 1 <= rank <= dy.rank:
            raise AdapterConfigError(
                f"rank {rank} is outside the ranks 1..{dy.rank} of {source}'s DyLoRA rule {rule.targets}"
            )
        plain = LoraConfig(rank=rank, alpha=dy.alpha, dropout=dy.dropout, use_rslora=dy.use_rslora)
        new_rules.append(AdapterRule(targets=list(rule.targets), adapter=plain, regex=rule.regex))
        for name in [name for name in modules if rule.matches(name)]:
            tensors[f"{name}.lora_A"] = tensors[f"{name}.lora_A"][:rank].contiguous()
            tensors[f"{name}.lora_B"] = tensors[f"{name}.lora_B"][:, :rank].contiguous()
            modules[name] = "lora"
    written = config | {"rules": [rule.to_dict() for rule in new_rules], "modules": modules}
    return write_folder_files(
        output, {WEIGHTS_FILE: tensors}, {CONFIG_FILE: json.dumps(written, indent=2)}, overwrite
    )

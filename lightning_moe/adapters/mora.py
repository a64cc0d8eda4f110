"""kind `mora`: MoRA rank experts ("Little by Little"): each rank-1 component is an expert that activates itself.

For a token x and atoms (a_i, b_i), atom i scores s_i = cos(a_i, x): the normalised A·x, so no
router exists. p = softmax(s / temperature) over the usable atoms; training keeps the top_k
atoms, evaluation those with p_i >= eval_threshold (or the top_k), and the kept weights are
renormalised: delta = scaling * sum_kept w_i * b_i * (a_i . x).

Continual learning: the current task trains `rank` new atoms (`lora_A`, `lora_B`); earlier
tasks' atoms sit in fixed-capacity buffers (`frozen_A`, `frozen_B`, the first `frozen_count`
rows used), so no optimizer can move them and checkpoints keep one shape. `freeze_task_atoms`
appends the current atoms there, pruning those that too few tokens chose, and starts new ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import Adapter, register_adapter
from .errors import AdapterConfigError
from .lora import LowRankConfig, zero_update_init_
from .rank_store import append_ranks


@dataclass
class MoraConfig(LowRankConfig):
    """MoRA, "Little by Little" (sparse mixture of rank-1 experts): every rank-1 component
    b_i a_i^T is an expert that scores itself by the cosine of a_i and the input (no router);
    each token uses the `top_k` best-scoring atoms (softmax over scores / `temperature`,
    renormalised over the chosen), at evaluation every atom whose probability reaches
    `eval_threshold`. Each task trains `rank` new atoms while earlier tasks' atoms stay frozen;
    atoms used by fewer than `prune_below` of the tokens during their task are pruned when frozen.

    Args:
        rank: New atoms per task.
        alpha, dropout, use_rslora, init: As in LoraConfig: "kaiming", "gaussian" or "eva" (the
            first task's atoms start on the top `rank` directions of the layer's inputs);
            scaling = alpha / rank.
        num_tasks: Capacity: tasks whose atoms the layer can hold.
        top_k: Atoms per token in training (the activation budget).
        temperature: Softmax temperature of the atoms' scores.
        eval_threshold: Evaluation keeps atoms with probability >= this (None: top-k as in training).
        prune_below: At freezing, atoms chosen by fewer than this share of tokens are pruned.
    """

    kind: ClassVar[str] = "mora"
    num_tasks: int = 10
    top_k: int = 2
    temperature: float = 1.0
    eval_threshold: float | None = None
    prune_below: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.allow_inits("rank experts", "kaiming", "gaussian", "eva")
        if self.num_tasks < 1 or not 1 <= self.top_k <= self.rank * self.num_tasks:
            raise AdapterConfigError(
                f"need num_tasks >= 1 and 1 <= top_k <= rank * num_tasks, got num_tasks={self.num_tasks}, "
                f"top_k={self.top_k}, rank={self.rank}"
            )
        if self.temperature <= 0 or not 0.0 <= self.prune_below < 1.0:
            raise AdapterConfigError(
                f"temperature must be > 0 and prune_below in [0, 1), got {self.temperature} and {self.prune_below}"
            )


@register_adapter
class MoraAdapter(Adapter):
    """Current atoms A: [r, in], B: [out, r]; frozen atoms of earlier tasks in buffers."""

    config_class = MoraConfig
    task_record = "mora_atoms_kept"

    def __init__(self, base_layer: nn.Linear, config: MoraConfig) -> None:
        super().__init__(base_layer, config)
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        capacity = config.rank * config.num_tasks
        self.scaling = config.scaling
        self.lora_A = nn.Parameter(torch.empty(config.rank, base_layer.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(base_layer.out_features, config.rank, **factory))
        self.register_buffer("frozen_A", torch.zeros(capacity, base_layer.in_features, **factory))
        self.register_buffer("frozen_B", torch.zeros(base_layer.out_features, capacity, **factory))
        self.register_buffer("frozen_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("usage", torch.zeros(config.rank), persistent=False)  # tokens per current atom
        self.register_buffer("seen_tokens", torch.zeros(()), persistent=False)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.reset_current()

    @torch.no_grad()
    def reset_current(self) -> None:
        zero_update_init_(self.lora_A, self.lora_B, self.config.init)
        self.usage.zero_()
        self.seen_tokens.zero_()

    def atoms(self) -> tuple[Tensor, Tensor]:
        """Every usable atom: (A [R, in], B [out, R]), frozen ones first."""
        count = int(self.frozen_count)
        return torch.cat([self.frozen_A[:count], self.lora_A]), torch.cat(
            [self.frozen_B[:, :count], self.lora_B], 1
        )

    def mixing_weights(self, projections: Tensor, x: Tensor, A: Tensor) -> Tensor:
        """[..., R] weights: softmax of the cosine scores, kept atoms renormalised, others 0."""
        scores = projections / (x.norm(dim=-1, keepdim=True) * A.norm(dim=-1) + 1e-6)
        probabilities = (scores / self.config.temperature).softmax(dim=-1)
        if self.training or self.config.eval_threshold is None:
            top = probabilities.topk(min(self.config.top_k, probabilities.shape[-1]), dim=-1).indices
            keep = torch.zeros_like(probabilities, dtype=torch.bool).scatter(-1, top, True)
        else:
            keep = probabilities >= self.config.eval_threshold
        kept = probabilities * keep
        return kept / kept.sum(dim=-1, keepdim=True).clamp(min=1e-12)

    def input_projection(self) -> Tensor:
        """The current task's atoms' A ([rank, in]) that EVA fills with input directions."""
        return self.lora_A

    def forward(self, x: Tensor) -> Tensor:
        x = self.dropout(x.to(self.lora_A.dtype))
        A, B = self.atoms()
        projections = F.linear(x, A)
        weights = self.mixing_weights(projections, x, A)
        if self.training:
            self.count_usage(weights)
        return F.linear(projections * weights, B) * self.scaling

    @torch.no_grad()
    def count_usage(self, weights: Tensor) -> None:
        current = weights.reshape(-1, weights.shape[-1])[:, int(self.frozen_count) :]
        self.usage += (current > 0).sum(dim=0).to(self.usage.dtype)
        self.seen_tokens += current.shape[0]

    @torch.no_grad()
    def freeze_task_atoms(self) -> int:
        """End of a task: keep its atoms that at least `prune_below` of the tokens chose, append
        them to the frozen atoms, start fresh ones; returns how many were kept."""
        share = self.usage / self.seen_tokens.clamp(min=1)
        keep = (share >= self.config.prune_below).nonzero().flatten()
        append_ranks(
            self.frozen_A,
            self.frozen_B,
            self.frozen_count,
            self.lora_A[keep],
            self.lora_B[:, keep],
            f"the rank experts hold atoms of num_tasks={self.config.num_tasks} tasks and are full; raise num_tasks",
        )
        self.reset_current()
        return len(keep)

    def end_task(self) -> int:
        return self.freeze_task_atoms()

"""MoRA rank experts ("Little by Little"): each rank-1 component is an expert that activates itself.

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

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .config import RankExpertsConfig
from .lora import zero_update_init_
from .rank_store import append_ranks, layers_with_adapter


class RankExpertsAdapter(nn.Module):
    """Current atoms A: [r, in], B: [out, r]; frozen atoms of earlier tasks in buffers."""

    mergeable = False  # which atoms act depends on the input

    def __init__(self, base_layer: nn.Linear, config: RankExpertsConfig) -> None:
        super().__init__()
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        capacity = config.rank * config.num_tasks
        self.config = config
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


def freeze_rank_expert_tasks(model: nn.Module) -> dict[str, int]:
    """`freeze_task_atoms` on every rank-expert layer; returns the atoms each kept."""
    return {
        name: layer.adapter.freeze_task_atoms()
        for name, layer in layers_with_adapter(model, RankExpertsAdapter)
    }

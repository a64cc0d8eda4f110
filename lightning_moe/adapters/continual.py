"""The task boundary of every continual-learning adapter, for any model that holds them."""

from __future__ import annotations

from torch import nn

from .rank_experts import freeze_rank_expert_tasks
from .rank_gates import merge_rank_gated_updates
from .task_experts import freeze_most_used_experts


def end_task(model: nn.Module) -> dict[str, dict]:
    """After training a task: MoRA freezes (and prunes) its atoms, CoDyRA merges its surviving
    ranks, MoE-Adapters freezes its most used experts. Returns what each layer kept or froze, by
    method (empty for methods the model does not use)."""
    return {
        "mora_atoms_kept": freeze_rank_expert_tasks(model),
        "codyra_ranks_kept": merge_rank_gated_updates(model),
        "moe_experts_frozen": freeze_most_used_experts(model),
    }

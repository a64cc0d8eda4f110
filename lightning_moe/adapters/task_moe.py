"""kind `task_moe`: MoE-Adapters (Yu et al., 2024, "Boosting Continual Learning of Vision-Language Models via
Mixture-of-Experts Adapters"): a bank of LoRA experts shared by all tasks, one router per task.

Training task t uses router t, so each task learns its own mix of the shared experts. After
each task the experts its router used most (counted per token) are frozen, so later tasks can
still route to them but no longer change them: frozen experts enter the computation detached,
so they get no gradient.

Evaluation routes a test set with the router of its task. A task with no trained router yet
(`set_active_task(model, None)`) gets no adapter update: the frozen base answers, which is what
the paper's distribution-discriminative selector learns to do for unseen data (here the task
identity is given, as in task-incremental evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from .base import register_adapter
from .errors import AdapterConfigError
from .moe import MoEAdapter, MoEConfig, router_arguments
from .rank_store import layers_with_adapter
from .routing import TopKRouter


@dataclass
class TaskMoEConfig(MoEConfig):
    """MoE-Adapters: LoRA experts shared by all tasks, one router per task; after each task the
    experts its router used most are frozen.

    Args:
        rank, alpha, dropout, use_rslora, init, num_experts, top_k, router_gradient,
            jitter_noise, backend: As in MoEConfig.
        num_tasks: Routers: tasks the layer can learn.
        freeze_per_task: Experts frozen after each task (the most used ones not frozen yet).
    """

    kind: ClassVar[str] = "task_moe"
    num_tasks: int = 10
    freeze_per_task: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_tasks < 1 or not 0 <= self.freeze_per_task <= self.num_experts:
            raise AdapterConfigError(
                f"need num_tasks >= 1 and 0 <= freeze_per_task <= num_experts={self.num_experts}, got "
                f"num_tasks={self.num_tasks}, freeze_per_task={self.freeze_per_task}"
            )


class TaskRouters(nn.Module):
    """One top-k router per task; `active` is the one that routes (None: no task)."""

    def __init__(self, num_tasks: int, **router_args) -> None:
        super().__init__()
        self.tasks = nn.ModuleList(TopKRouter(**router_args) for _ in range(num_tasks))
        self.active: int | None = 0

    def forward(self, x: Tensor, logit_bias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        return self.tasks[self.active](x, logit_bias)


@register_adapter
class TaskMoEAdapter(MoEAdapter):
    """Shared expert bank (stacked, as in `MoEAdapter`), per-task routers, frozen experts."""

    config_class = TaskMoEConfig
    task_record = "moe_experts_frozen"

    def __init__(self, base_layer: nn.Linear, config: TaskMoEConfig) -> None:
        super().__init__(base_layer, config)
        self.freeze_per_task = config.freeze_per_task
        self.register_buffer("frozen_experts", torch.zeros(config.num_experts, dtype=torch.bool))
        self.register_buffer("usage", torch.zeros(config.num_experts), persistent=False)

    def build_router(self, base_layer: nn.Linear, config: TaskMoEConfig, factory: dict) -> nn.Module:
        return TaskRouters(
            config.num_tasks, in_features=base_layer.in_features, **router_arguments(config), **factory
        )

    def frozen_mask(self) -> Tensor:
        return self.frozen_experts

    def set_task(self, task: int | None) -> None:
        if task is not None and not 0 <= task < len(self.router.tasks):
            raise AdapterConfigError(
                f"task {task} has no router: the layer has routers for num_tasks={len(self.router.tasks)}"
            )
        self.router.active = task

    def route(self, flat: Tensor, lead_shape: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
        indices, weights, logits = super().route(flat, lead_shape)
        if self.training:
            self.count_usage(indices)
        return indices, weights, logits

    def forward(self, x: Tensor) -> Tensor:
        if self.router.active is None:
            return x.new_zeros(*x.shape[:-1], self.experts.lora_B.shape[1])
        return super().forward(x)

    @torch.no_grad()
    def count_usage(self, indices: Tensor) -> None:
        self.usage += torch.bincount(indices.flatten(), minlength=self.usage.numel()).to(self.usage.dtype)

    @torch.no_grad()
    def freeze_most_used(self) -> list[int]:
        """End of a task: freeze the `freeze_per_task` most used experts not frozen yet; returns
        the expert indices frozen now."""
        usage = self.usage.masked_fill(self.frozen_experts, -1.0)
        count = min(self.freeze_per_task, int((~self.frozen_experts).sum()))
        chosen = usage.topk(count).indices.tolist() if count else []
        self.frozen_experts[chosen] = True
        self.usage.zero_()
        return chosen

    def end_task(self) -> list[int]:
        return self.freeze_most_used()


def set_active_task(model: nn.Module, task: int | None) -> None:
    """Route every task-routed layer with task `task`'s routers (None: no adapter update)."""
    for _, layer in layers_with_adapter(model, TaskMoEAdapter):
        layer.adapter.set_task(task)

"""MoE-Adapters (shared experts, per-task routers, frozen most-used experts) against a plain
mixture of LoRA experts, and the task boundary of every continual adapter."""

import copy

import pytest
import torch
from torch import nn

from lightning_moe.adapters import (
    AdapterRule,
    MoEConfig,
    TaskMoEConfig,
    config_from_dict,
    end_task,
    inject,
    load_adapter,
    save_adapter,
)
from lightning_moe.adapters.errors import AdapterConfigError
from lightning_moe.adapters.task_moe import set_active_task

CONFIG = {"rank": 2, "alpha": 4, "num_experts": 4, "top_k": 2, "backend": "loop"}


def task_moe_linear(**options) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    config = TaskMoEConfig(**(CONFIG | {"num_tasks": 3, "freeze_per_task": 1} | options))
    inject(model, [AdapterRule(targets=["0"], adapter=config)])
    with torch.no_grad():
        model[0].adapter.experts.lora_B.normal_()
    return model


def test_each_task_routes_the_shared_experts_like_a_plain_mixture_with_its_router():
    model = task_moe_linear()
    reference = nn.Sequential(nn.Linear(6, 5))
    inject(reference, [AdapterRule(targets=["0"], adapter=MoEConfig(**CONFIG))])
    reference[0].base_layer.load_state_dict(model[0].base_layer.state_dict())
    reference[0].adapter.experts.load_state_dict(model[0].adapter.experts.state_dict())
    x = torch.randn(7, 6)
    for task in range(3):
        set_active_task(model, task)
        reference[0].adapter.router.load_state_dict(model[0].adapter.router.tasks[task].state_dict())
        torch.testing.assert_close(model(x), reference(x))
    outputs = [set_active_task(model, task) or model(x) for task in range(3)]
    assert not torch.allclose(outputs[0], outputs[1])  # the routers differ


def test_no_active_task_is_the_frozen_base():
    model = task_moe_linear()
    set_active_task(model, None)
    x = torch.randn(3, 6)
    torch.testing.assert_close(model(x), model[0].base_layer(x))
    with pytest.raises(AdapterConfigError, match="num_tasks=3"):
        set_active_task(model, 3)


def test_the_most_used_expert_is_frozen_and_no_longer_moves():
    model = task_moe_linear(top_k=1)
    adapter = model[0].adapter
    set_active_task(model, 0)
    with torch.no_grad():  # router 0 sends positive inputs to expert 2, negative ones to expert 0
        adapter.router.tasks[0].gate.weight.zero_()
        adapter.router.tasks[0].gate.weight[2] = 1.0
        adapter.router.tasks[0].gate.weight[0] = -1.0
    x = torch.rand(10, 6) + 0.1
    x[7:] *= -1
    model(x)
    assert adapter.usage.tolist() == [3.0, 0.0, 7.0, 0.0]
    assert end_task(model) == {
        "mora_atoms_kept": {},
        "codyra_ranks_kept": {},
        "moe_experts_frozen": {"0": [2]},
    }
    frozen_expert = 2
    assert adapter.frozen_experts.tolist() == [False, False, True, False]
    assert adapter.usage.sum() == 0
    set_active_task(model, 1)
    before = adapter.experts.lora_A.detach().clone(), adapter.experts.lora_B.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.0)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(16, 6)).square().sum().backward()
        optimizer.step()
    for after, start in zip((adapter.experts.lora_A, adapter.experts.lora_B), before, strict=True):
        assert torch.equal(after[frozen_expert], start[frozen_expert])
        moved = [i for i in range(4) if not torch.equal(after[i], start[i])]
        assert frozen_expert not in moved and moved


def test_config_round_trip_checkpoint_and_bad_values(tmp_path):
    config = TaskMoEConfig(**(CONFIG | {"num_tasks": 3}))
    assert config_from_dict(config.to_dict()) == config
    with pytest.raises(AdapterConfigError, match="freeze_per_task"):
        TaskMoEConfig(num_experts=2, top_k=1, freeze_per_task=3)
    model = task_moe_linear()
    model[0].adapter.frozen_experts[3] = True
    save_adapter(model, [AdapterRule(targets=["0"], adapter=config)], tmp_path / "a")
    fresh = nn.Sequential(nn.Linear(6, 5))
    fresh[0].load_state_dict(model[0].base_layer.state_dict())
    load_adapter(fresh, tmp_path / "a")
    assert fresh[0].adapter.frozen_experts.tolist() == [False, False, False, True]
    x = torch.randn(2, 6)
    for task in (0, 2):
        set_active_task(model, task)
        set_active_task(fresh, task)
        torch.testing.assert_close(fresh(x), model(x))


@pytest.mark.parametrize("backend", ["loop", "dense", "grouped"])
def test_frozen_experts_get_no_gradient_on_every_backend_and_in_copies(backend):
    model = task_moe_linear(backend=backend)
    model[0].adapter.frozen_experts[1] = True
    for candidate in (model, copy.deepcopy(model)):
        experts = candidate[0].adapter.experts
        candidate(torch.randn(32, 6)).square().sum().backward()
        for parameter in (experts.lora_A, experts.lora_B):
            assert torch.equal(parameter.grad[1], torch.zeros_like(parameter.grad[1]))
            assert all(parameter.grad[i].abs().sum() > 0 for i in (0, 2, 3))

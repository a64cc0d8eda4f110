"""Rank-gated LoRA (CoDyRA) against its dense formula, the proximal step, and the task-end merge."""

import pytest
import torch
from torch import nn

from lightning_moe.adapters import (
    AdapterRule,
    CodyraConfig,
    config_from_dict,
    end_task,
    inject,
    load_adapter,
    save_adapter,
)
from lightning_moe.adapters.codyra import rank_gated_layers, soft_threshold_rank_gates
from lightning_moe.adapters.errors import AdapterConfigError
from tests.tolerances import assert_same_maths


def gated_linear(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """float64 where a test compares against the dense formula (see assert_same_maths)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5, dtype=dtype))
    inject(model, [AdapterRule(targets=["0"], adapter=CodyraConfig(rank=4, alpha=8))])
    adapter = model[0].adapter
    with torch.no_grad():
        adapter.lora_B.normal_()
        adapter.rank_gates.copy_(torch.tensor([1.0, -0.5, 0.0, 2.0]))
    return model


def test_output_and_gradients_equal_the_dense_formula():
    model = gated_linear(dtype=torch.float64)
    layer = model[0]
    adapter = layer.adapter
    x = torch.randn(3, 6, dtype=torch.float64)
    out = model(x)
    A, B, g = (
        p.detach().clone().requires_grad_(True) for p in (adapter.lora_A, adapter.lora_B, adapter.rank_gates)
    )
    weight = layer.base_layer.weight + 2.0 * B @ torch.diag(g) @ A  # scaling alpha / r = 2
    expected = x @ weight.T + layer.base_layer.bias
    assert_same_maths(out, expected)
    out.square().sum().backward()
    expected.square().sum().backward()
    for ours, reference in zip((adapter.lora_A, adapter.lora_B, adapter.rank_gates), (A, B, g), strict=True):
        assert_same_maths(ours.grad, reference.grad)


def test_the_proximal_step_shrinks_gates_and_stops_at_zero():
    model = gated_linear()
    with torch.no_grad():
        model[0].adapter.rank_gates.copy_(torch.tensor([0.5, -0.2, 0.05, -0.01]))
    soft_threshold_rank_gates(model, amount=0.1)
    torch.testing.assert_close(model[0].adapter.rank_gates.detach(), torch.tensor([0.4, -0.1, 0.0, 0.0]))
    assert model[0].adapter.active_ranks == 2


def test_the_task_end_merge_keeps_the_function_and_frees_the_ranks():
    model = gated_linear(dtype=torch.float64)
    pretrained = model[0].base_layer.weight.detach().clone()
    x = torch.randn(4, 6, dtype=torch.float64)
    before = model(x).detach()
    kept = end_task(model)["codyra_ranks_kept"]
    assert kept == {"0": 3}  # the rank with gate 0 was pruned
    assert_same_maths(model(x), before)
    adapter = model[0].adapter
    assert torch.equal(adapter.lora_B, torch.zeros_like(adapter.lora_B))
    assert torch.equal(adapter.rank_gates, torch.ones(4))
    assert int(adapter.merged_count) == 3
    assert torch.equal(model[0].base_layer.weight, pretrained)  # merged beside W, W untouched
    assert [name for name, _ in rank_gated_layers(model)] == ["0"]


def test_merges_of_two_tasks_add_up_to_the_dense_merged_weight():
    model = gated_linear(dtype=torch.float64)
    layer, adapter = model[0], model[0].adapter
    first = adapter.delta_weight().detach().clone()
    end_task(model)
    with torch.no_grad():  # a second task's ranks
        adapter.lora_B.normal_()
        adapter.rank_gates.copy_(torch.tensor([0.0, 0.3, 1.5, 0.0]))
    second = (adapter.lora_B * adapter.rank_gates) @ adapter.lora_A * adapter.scaling
    end_task(model)
    assert int(adapter.merged_count) == 5
    x = torch.randn(4, 6, dtype=torch.float64)
    weight = layer.base_layer.weight + first + second
    assert_same_maths(model(x), x @ weight.T + layer.base_layer.bias)
    assert_same_maths(adapter.delta_weight(), first + second)


def test_a_full_merge_store_is_a_clear_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    inject(model, [AdapterRule(targets=["0"], adapter=CodyraConfig(rank=4, num_tasks=1))])
    end_task(model)
    with pytest.raises(AdapterConfigError, match="num_tasks=1"):
        end_task(model)


def test_config_round_trip_and_checkpoint(tmp_path):
    config = CodyraConfig(rank=4, alpha=8, gate_init=0.5)
    assert config_from_dict(config.to_dict()) == config
    with pytest.raises(AdapterConfigError, match="pissa"):
        CodyraConfig(init="pissa")
    model = gated_linear()
    end_task(model)  # a task's merged ranks travel with the checkpoint
    with torch.no_grad():
        model[0].adapter.lora_B.normal_()
    save_adapter(model, [AdapterRule(targets=["0"], adapter=CodyraConfig(rank=4, alpha=8))], tmp_path / "a")
    fresh = nn.Sequential(nn.Linear(6, 5))
    fresh.load_state_dict(
        {k.replace("base_layer.", ""): v for k, v in model.state_dict().items() if "adapter" not in k}
    )
    load_adapter(fresh, tmp_path / "a")
    x = torch.randn(2, 6)
    torch.testing.assert_close(fresh(x), model(x))

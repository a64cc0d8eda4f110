"""MoRA rank experts against a per-token loop reference; task freezing, pruning and capacity."""

import pytest
import torch
from torch import nn

from lightning_moe.adapters import AdapterRule, MoraConfig, end_task, inject, load_adapter, save_adapter
from lightning_moe.adapters.errors import AdapterConfigError
from tests.tolerances import assert_same_maths


def experts_linear(dtype: torch.dtype = torch.float32, **options) -> nn.Sequential:
    """float64 where a test compares against the loop reference (see assert_same_maths)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5, dtype=dtype))
    config = MoraConfig(rank=4, alpha=4, **({"num_tasks": 3, "top_k": 2} | options))
    inject(model, [AdapterRule(targets=["0"], adapter=config)])
    with torch.no_grad():
        model[0].adapter.lora_B.normal_()
    return model


def loop_reference(x, A, B, scaling, temperature, keep_rule):
    """Token by token, atom by atom: the formula in the module docstring."""
    rows = []
    for token in x:
        scores = torch.stack([a @ token / (a.norm() * token.norm() + 1e-6) for a in A])
        p = (scores / temperature).softmax(0)
        keep = keep_rule(p)
        weights = torch.where(keep, p, torch.zeros_like(p))
        weights = weights / weights.sum()
        rows.append(sum(weights[i] * (A[i] @ token) * B[:, i] for i in range(len(A))) * scaling)
    return torch.stack(rows)


def top2(p):
    return torch.zeros_like(p, dtype=torch.bool).scatter(0, p.topk(2).indices, True)


def test_training_output_and_gradients_equal_the_loop_reference():
    model = experts_linear(torch.float64).train()
    adapter = model[0].adapter
    x = torch.randn(7, 6, dtype=torch.float64)
    out = adapter(x)
    A, B = (p.detach().clone().requires_grad_(True) for p in (adapter.lora_A, adapter.lora_B))
    expected = loop_reference(x, A, B, 1.0, 1.0, top2)
    assert_same_maths(out, expected)
    out.square().sum().backward()
    expected.square().sum().backward()
    assert_same_maths(adapter.lora_A.grad, A.grad)
    assert_same_maths(adapter.lora_B.grad, B.grad)


def test_evaluation_keeps_atoms_above_the_threshold():
    model = experts_linear(torch.float64, eval_threshold=0.2, temperature=0.5).eval()
    adapter = model[0].adapter
    x = torch.randn(5, 6, dtype=torch.float64)
    expected = loop_reference(x, adapter.lora_A, adapter.lora_B, 1.0, 0.5, lambda p: p >= 0.2)
    assert_same_maths(adapter(x), expected)


def test_frozen_tasks_keep_their_atoms_and_get_no_gradient():
    model = experts_linear(torch.float64).train()
    adapter = model[0].adapter
    x = torch.randn(9, 6, dtype=torch.float64)
    adapter(x)
    first_A, first_B = adapter.lora_A.detach().clone(), adapter.lora_B.detach().clone()
    assert end_task(model)["mora_atoms_kept"] == {"0": 4}
    assert int(adapter.frozen_count) == 4 and torch.equal(adapter.frozen_A[:4], first_A)
    assert torch.equal(adapter.lora_B, torch.zeros_like(adapter.lora_B))  # new atoms: zero update
    A, B = adapter.atoms()
    assert A.shape == (8, 6) and torch.equal(B[:, :4], first_B)
    model(x).square().sum().backward()
    trainable = {name for name, p in adapter.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"} and adapter.lora_A.grad is not None  # frozen atoms are buffers
    with torch.no_grad():
        adapter.lora_B.normal_()
    adapter.eval()
    expected = loop_reference(x, A, torch.cat([first_B, adapter.lora_B], 1), 1.0, 1.0, top2)
    assert_same_maths(adapter(x), expected)


def test_rarely_chosen_atoms_are_pruned_and_capacity_is_enforced():
    model = experts_linear(prune_below=0.3, num_tasks=1).train()
    adapter = model[0].adapter
    adapter.usage.copy_(torch.tensor([10.0, 0.0, 2.0, 5.0]))
    adapter.seen_tokens.fill_(10)
    assert end_task(model)["mora_atoms_kept"] == {"0": 2}  # atoms chosen by 100 % and 50 % of tokens
    assert end_task(model)["mora_atoms_kept"] == {"0": 0}  # nothing seen: all pruned, capacity left
    adapter.usage.fill_(10.0)
    adapter.seen_tokens.fill_(10)
    with pytest.raises(AdapterConfigError, match="num_tasks=1 tasks and are full"):
        end_task(model)["mora_atoms_kept"]


def test_checkpoints_keep_frozen_atoms(tmp_path):
    model = experts_linear().train()
    model(torch.randn(4, 6))
    end_task(model)["mora_atoms_kept"]
    rules = [AdapterRule(targets=["0"], adapter=MoraConfig(rank=4, alpha=4, num_tasks=3, top_k=2))]
    save_adapter(model, rules, tmp_path / "mora")
    fresh = nn.Sequential(nn.Linear(6, 5))
    fresh[0].load_state_dict(model[0].base_layer.state_dict())
    load_adapter(fresh, tmp_path / "mora")
    x = torch.randn(3, 6)
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x))


def test_bad_settings_are_refused():
    with pytest.raises(AdapterConfigError, match="top_k <= rank \\* num_tasks"):
        MoraConfig(rank=2, num_tasks=1, top_k=3)
    with pytest.raises(AdapterConfigError, match="temperature must be > 0"):
        MoraConfig(temperature=0)

"""kind `dense`: W + dW with dW trained is full fine-tuning of the layer, step for step."""

import copy

import torch
from torch import nn

from lightning_moe.adapters import AdapterRule, inject, load_adapter, merge_adapters, save_adapter
from tests.tolerances import assert_same_maths


def test_dense_update_trains_exactly_like_the_full_weight(tmp_path):
    torch.manual_seed(0)
    full = nn.Sequential(nn.Linear(5, 4)).double()
    adapted = copy.deepcopy(full)
    rules = [AdapterRule(targets=["0"], adapter={"kind": "dense"})]
    inject(adapted, rules)
    full[0].bias.requires_grad_(False)
    optimizers = [
        torch.optim.AdamW([full[0].weight], lr=0.1, weight_decay=0.0),
        torch.optim.AdamW(adapted.parameters(), lr=0.1, weight_decay=0.0),
    ]
    for _ in range(3):
        x = torch.randn(6, 5, dtype=torch.float64)
        for model, optimizer in zip((full, adapted), optimizers, strict=True):
            optimizer.zero_grad()
            model(x).sin().sum().backward()
            optimizer.step()
    assert_same_maths(adapted[0].base_layer.weight + adapted[0].adapter.delta, full[0].weight)
    save_adapter(adapted, rules, tmp_path / "dense")
    fresh = nn.Sequential(nn.Linear(5, 4)).double()
    fresh.load_state_dict(
        {k.replace("base_layer.", ""): v for k, v in adapted.state_dict().items() if "base_layer" in k}
    )
    load_adapter(fresh, tmp_path / "dense")
    x = torch.randn(3, 5, dtype=torch.float64)
    assert torch.equal(fresh(x), adapted(x))
    merge_adapters(fresh)
    assert_same_maths(fresh(x), full(x))

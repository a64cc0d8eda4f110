"""DyLoRA: the rank-b forward is the rank-b LoRA exactly, the frozen mode trains only the b-th
rank, ranks are drawn per step reproducibly, and truncated folders compute the same."""

import json

import pytest
import torch
from torch import nn

from lightning_moe.adapters import AdapterConfigError, AdapterRule, adapted_layers, config_from_dict, inject
from lightning_moe.adapters.adapter_folder import load_adapter, save_adapter
from lightning_moe.adapters.dylora import DyLoraConfig, sample_active_ranks, set_eval_rank, truncate_folder
from lightning_moe.adapters.peft_interop import export_peft
from tests.tolerances import assert_same_maths


def dylora_layer(**options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10)).double()
    inject(model, [AdapterRule(targets=["0"], adapter=DyLoraConfig(rank=6, alpha=9.0, **options))])
    with torch.no_grad():
        model[0].adapter.lora_B.normal_()
    return model


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_rank_b_forward_is_the_rank_b_lora(rank):
    model = dylora_layer()
    x = torch.randn(5, 12, dtype=torch.float64)
    adapter = model[0].adapter
    set_eval_rank(model, rank)
    model.eval()
    expected = (
        model[0].base_layer(x) + (9.0 / rank) * x @ adapter.lora_A[:rank].T @ adapter.lora_B[:, :rank].T
    )
    assert_same_maths(model(x), expected)


def test_frozen_mode_trains_only_the_sampled_rank():
    for train_lower, trained_rows in ((False, [3]), (True, [0, 1, 2, 3])):
        model = dylora_layer(train_lower_ranks=train_lower).train()
        model[0].adapter.active_rank = 4
        model(torch.randn(5, 12, dtype=torch.float64)).square().sum().backward()
        adapter = model[0].adapter
        rows_with_grad = [i for i in range(6) if adapter.lora_A.grad[i].abs().sum() > 0]
        cols_with_grad = [i for i in range(6) if adapter.lora_B.grad[:, i].abs().sum() > 0]
        assert rows_with_grad == trained_rows and cols_with_grad == trained_rows


def test_ranks_are_a_function_of_seed_and_step():
    model = dylora_layer()
    draws = [sample_active_ranks(model, seed=3, step=step) for step in range(400)]
    assert draws == [sample_active_ranks(model, seed=3, step=step) for step in range(400)]
    assert draws != [sample_active_ranks(model, seed=4, step=step) for step in range(400)]
    counts = torch.bincount(torch.tensor(draws), minlength=7)[1:]
    assert counts.min() > 40  # uniform on 1..6: about 67 each
    geometric = dylora_layer(rank_distribution="geometric", min_rank=2)
    draws = torch.tensor([sample_active_ranks(geometric, seed=3, step=step) for step in range(400)])
    assert draws.min() == 2 and (draws == 2).sum() > (draws == 3).sum() > (draws == 4).sum()


def test_a_truncated_folder_computes_the_dylora_at_that_rank(tmp_path):
    model = dylora_layer()
    rules = [AdapterRule(targets=["0"], adapter=DyLoraConfig(rank=6, alpha=9.0))]
    save_adapter(model, rules, tmp_path / "dylora")
    x = torch.randn(5, 12, dtype=torch.float64)
    model.eval()
    for rank in (2, 5):
        truncate_folder(tmp_path / "dylora", rank, tmp_path / f"r{rank}")
        fresh = nn.Sequential(nn.Linear(12, 10)).double()
        fresh.load_state_dict(
            {
                "0." + k.removeprefix("0.base_layer."): v
                for k, v in model.state_dict().items()
                if "base_layer" in k
            }
        )
        load_adapter(fresh, tmp_path / f"r{rank}")
        ((_, layer),) = adapted_layers(fresh)
        assert layer.config.kind == "lora" and layer.adapter.lora_A.shape[0] == rank
        set_eval_rank(model, rank)
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
        export_peft(model, tmp_path / f"peft{rank}")  # exports see the rank in use
        assert json.loads((tmp_path / f"peft{rank}" / "adapter_config.json").read_text())["r"] == rank
    with pytest.raises(AdapterConfigError, match="rank 7 is outside the ranks 1..6"):
        truncate_folder(tmp_path / "dylora", 7, tmp_path / "r7")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"min_rank": 0}, r"min_rank must be in \[1, rank=8\]"),
        ({"eval_rank": 9}, r"eval_rank must be in \[1, rank=8\]"),
        ({"init": "eva"}, "init='eva' does not apply to DyLoRA's nested ranks"),
    ],
)
def test_bad_dylora_options_are_refused(options, message):
    with pytest.raises(AdapterConfigError, match=message):
        config_from_dict({"kind": "dylora", **options})

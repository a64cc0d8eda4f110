"""Plain LoRA: scaling, inits (kaiming, gaussian, PiSSA), dropout, merge / unmerge."""

import math

import pytest
import torch
from torch import nn

from lightning_moe.adapters import (
    AdaptedLinear,
    AdapterConfigError,
    AdapterRule,
    LoraConfig,
    MoEConfig,
    inject,
    merge_adapters,
    unmerge_adapters,
)
from lightning_moe.adapters.layer import build_adapter
from tests.tolerances import assert_same_maths


def make_layer(
    config, in_features: int = 24, out_features: int = 20, seed: int = 0, dtype: torch.dtype = torch.float32
) -> AdaptedLinear:
    """float64 where a test checks exact maths (formula, merge) through other kernels."""
    torch.manual_seed(seed)
    base = nn.Linear(in_features, out_features, dtype=dtype)
    base.requires_grad_(False)
    return AdaptedLinear(base, build_adapter(config, base), config)


def test_scaling_is_alpha_over_rank_or_over_sqrt_rank_with_rslora():
    assert LoraConfig(rank=8, alpha=16).scaling == 2.0
    assert LoraConfig(rank=4, alpha=8, use_rslora=True).scaling == 4.0
    assert LoraConfig(rank=6, alpha=5, use_rslora=True).scaling == pytest.approx(5 / math.sqrt(6), rel=1e-15)
    assert MoEConfig(rank=16, alpha=8, use_rslora=True).scaling == 2.0


@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_adds_scaled_low_rank_update(use_rslora):
    config = LoraConfig(rank=6, alpha=5.0, use_rslora=use_rslora)
    layer = make_layer(config, dtype=torch.float64)
    torch.manual_seed(1)
    with torch.no_grad():
        layer.adapter.lora_B.normal_()
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    expected_scaling = 5.0 / (math.sqrt(6) if use_rslora else 6)
    expected = layer.base_layer(x) + expected_scaling * (x @ layer.adapter.lora_A.T @ layer.adapter.lora_B.T)
    assert_same_maths(layer(x), expected)


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_kaiming_and_gaussian_start_with_b_zero_so_output_equals_base(init):
    rank, in_features = 4, 256
    layer = make_layer(LoraConfig(rank=rank, alpha=8, init=init), in_features=in_features)
    adapter = layer.adapter
    assert torch.count_nonzero(adapter.lora_B) == 0
    assert torch.count_nonzero(adapter.lora_A) == adapter.lora_A.numel()
    if init == "gaussian":  # A ~ N(0, std=1/r)
        assert adapter.lora_A.std().item() == pytest.approx(1 / rank, rel=0.1)
    else:  # nn.Linear's kaiming-uniform: U(-1/sqrt(in), 1/sqrt(in))
        bound = 1 / math.sqrt(in_features)
        assert adapter.lora_A.abs().max().item() <= bound
        assert adapter.lora_A.abs().max().item() > 0.9 * bound
    x = torch.randn(2, 3, in_features)
    assert torch.equal(layer(x), layer.base_layer(x))


def test_pissa_starts_at_base_output_and_factors_the_top_singular_part():
    rank = 3
    config = LoraConfig(rank=rank, alpha=6.0, init="pissa")
    layer = make_layer(config)
    adapter = layer.adapter
    x = torch.randn(4, 24)
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=1e-6)

    # PiSSA's SVD runs in fp32 (pissa_factors), so this stays fp32. An SVD is backward stable: its
    # factors reproduce W, and singular values move, by at most ~n * u * |W|_2 (n = 24 columns,
    # u = 2^-24, |W|_2 ~ 1.1 for this init): 1.6e-6, well inside atol 1e-5.
    weight = layer.base_layer.weight
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    principal = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
    torch.testing.assert_close(
        config.scaling * adapter.lora_B @ adapter.lora_A, principal, rtol=1e-5, atol=1e-5
    )
    # what is left of W has exactly the remaining singular values
    residual = weight - config.scaling * adapter.pissa_B0 @ adapter.pissa_A0
    torch.testing.assert_close(
        torch.linalg.svdvals(residual)[: s.numel() - rank], s[rank:], rtol=1e-4, atol=1e-5
    )
    # A, B are the trainable copies; the offset is a buffer, and the frozen W itself was not modified
    assert {name for name, _ in adapter.named_parameters()} == {"lora_A", "lora_B"}
    assert torch.equal(adapter.lora_A, adapter.pissa_A0) and torch.equal(adapter.lora_B, adapter.pissa_B0)
    assert torch.equal(weight, make_layer(config).base_layer.weight)


def test_pissa_update_moves_away_from_base_once_a_and_b_change():
    layer = make_layer(LoraConfig(rank=3, alpha=6.0, init="pissa"))
    x = torch.randn(4, 24)
    layer(x).square().sum().backward()
    assert layer.adapter.lora_A.grad.abs().sum() > 0 and layer.adapter.lora_B.grad.abs().sum() > 0
    with torch.no_grad():
        layer.adapter.lora_A -= 0.1 * layer.adapter.lora_A.grad
    assert not torch.allclose(layer(x), layer.base_layer(x), atol=1e-4)


def test_dropout_only_in_training():
    layer = make_layer(LoraConfig(rank=4, alpha=8, dropout=0.5), dtype=torch.float64)
    torch.manual_seed(2)
    with torch.no_grad():
        layer.adapter.lora_B.normal_()
    x = torch.randn(8, 24, dtype=torch.float64)
    layer.eval()
    eval_out = layer(x)
    assert torch.equal(layer(x), eval_out)
    no_dropout = layer.base_layer(x) + layer.adapter.scaling * (
        x @ layer.adapter.lora_A.T @ layer.adapter.lora_B.T
    )
    assert_same_maths(eval_out, no_dropout)

    layer.train()
    torch.manual_seed(3)
    first = layer(x)
    second = layer(x)
    assert not torch.allclose(first, eval_out, atol=1e-3)
    assert not torch.allclose(first, second, atol=1e-3)
    # dropout sits on the adapter input only: the base path is untouched
    with torch.no_grad():
        layer.adapter.lora_B.zero_()
    assert torch.equal(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("init", ["kaiming", "gaussian", "pissa"])
def test_merge_equals_unmerged_forward_and_unmerge_restores_base(init):
    config = LoraConfig(rank=4, alpha=8, init=init, use_rslora=init == "gaussian")
    layer = make_layer(config, dtype=torch.float64)
    torch.manual_seed(4)
    with torch.no_grad():  # a "trained" adapter
        layer.adapter.lora_A.add_(0.3 * torch.randn_like(layer.adapter.lora_A))
        layer.adapter.lora_B.add_(0.3 * torch.randn_like(layer.adapter.lora_B))
    x = torch.randn(5, 24, dtype=torch.float64)
    base_weight = layer.base_layer.weight.clone()
    unmerged = layer(x)
    assert not torch.allclose(unmerged, layer.base_layer(x), atol=1e-3)

    layer.merge()
    assert layer.merged
    assert not torch.allclose(layer.base_layer.weight, base_weight)
    assert_same_maths(layer(x), unmerged)
    # merged forward is the base layer alone: it no longer depends on the adapter factors
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)
    merged_weight = layer.base_layer.weight.clone()
    layer.merge()  # idempotent
    assert torch.equal(layer.base_layer.weight, merged_weight)

    layer.unmerge()
    assert not layer.merged
    assert_same_maths(layer.base_layer.weight, base_weight)
    assert_same_maths(layer(x), unmerged)


def test_merge_adapters_on_a_model(make_llama, input_ids, randomize):
    model = make_llama(dtype=torch.float64)
    inject(
        model,
        [AdapterRule(targets=["q_proj", "v_proj", "mlp.down_proj"], adapter=LoraConfig(rank=4, alpha=8))],
    )
    randomize(model)
    weights = {name: p.clone() for name, p in model.named_parameters() if "base_layer" in name}
    with torch.no_grad():
        unmerged = model(input_ids).logits
        merge_adapters(model)
        assert_same_maths(model(input_ids).logits, unmerged)
        unmerge_adapters(model)
    for name, p in model.named_parameters():
        if "base_layer" in name:
            assert_same_maths(p, weights[name])


def test_merging_a_moe_layer_raises_and_changes_nothing():
    layer = make_layer(MoEConfig(rank=4, num_experts=3))
    weight = layer.base_layer.weight.clone()
    with pytest.raises(AdapterConfigError, match="'moe'"):
        layer.merge()
    assert not layer.merged
    assert torch.equal(layer.base_layer.weight, weight)


def test_merge_adapters_with_a_moe_layer_merges_nothing(make_llama, randomize):
    model = make_llama()
    inject(
        model,
        [
            AdapterRule(targets=["self_attn.q_proj"], adapter=LoraConfig(rank=4)),
            AdapterRule(targets=["mlp.up_proj"], adapter=MoEConfig(rank=4, num_experts=2)),
        ],
    )
    randomize(model)
    weights = {name: p.clone() for name, p in model.named_parameters() if "base_layer" in name}
    with pytest.raises(AdapterConfigError, match=r"model\.layers\.0\.mlp\.up_proj.*'moe'"):
        merge_adapters(model)
    for name, p in model.named_parameters():
        if "base_layer" in name:
            assert torch.equal(p, weights[name]), name
    assert not any(m.merged for m in model.modules() if isinstance(m, AdaptedLinear))

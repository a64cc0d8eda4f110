"""Load-balance loss, router z-loss and routing statistics on hand-built routing records."""

import math

import pytest
import torch

from lightning_moe.adapters import RoutingRecord, load_balance_loss, router_z_loss, routing_statistics

# The losses are computed in fp32 (aux_losses.py upcasts the logits), against exact values. Balance
# losses are chains of < 16 roundings (a softmax over <= 4 experts, sums over <= 10 tokens, the
# product and the sum over experts): rel 1e-6 ~ 17 u, u = 2^-24. Where log/exp of logits up to
# ~10 enter (z-loss, entropy) their rounding scales with the logits: rel 1e-5.


def record(logits, indices, layer: str = "layers.0.mlp") -> dict[str, RoutingRecord]:
    logits = torch.as_tensor(logits, dtype=torch.float32)
    indices = torch.as_tensor(indices)
    return {layer: RoutingRecord(layer, logits, indices)}


def probs_to_logits(probs) -> torch.Tensor:
    return torch.as_tensor(probs, dtype=torch.float64).log().float()


@pytest.mark.parametrize("scope", ["batch", "sample"])
def test_uniform_routing_gives_exactly_one(scope):
    # [B=2, T=4, E=4]: equal router probabilities, and every expert gets the same number of tokens
    logits = torch.zeros(2, 4, 4)
    top1 = torch.arange(8).remainder(4).view(2, 4, 1)
    assert load_balance_loss(record(logits, top1), scope=scope).item() == 1.0
    top2 = torch.stack([top1[..., 0], (top1[..., 0] + 2) % 4], dim=-1)
    assert load_balance_loss(record(logits, top2), scope=scope).item() == 1.0


def test_collapsed_routing_gives_num_experts():
    num_experts = 4
    logits = torch.full((2, 5, num_experts), -30.0)
    logits[..., 0] = 30.0  # every token puts (almost) all its probability on expert 0 ...
    indices = torch.zeros(2, 5, 1, dtype=torch.long)  # ... and is routed there
    loss = load_balance_loss(record(logits, indices))
    assert loss.item() == pytest.approx(num_experts, rel=1e-6)
    # half of the tokens collapsed onto expert 0, the other half spread evenly: in between
    half = logits.clone()
    half[1] = 0.0
    half_indices = indices.clone()
    half_indices[1, :4, 0] = torch.arange(4)
    half_indices[1, 4, 0] = 0
    between = load_balance_loss(record(half, half_indices)).item()
    f0, p0 = (5 + 2) / 10, (5 * 1.0 + 5 * 0.25) / 10
    f_other, p_other = 1 / 10, (5 * 0.25) / 10
    assert between == pytest.approx(num_experts * (f0 * p0 + 3 * f_other * p_other), rel=1e-5)
    assert 1.0 < between < num_experts


def test_masked_tokens_are_ignored():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 4)
    indices = logits.topk(2, dim=-1).indices
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    loss = load_balance_loss(record(logits, indices), mask=mask)
    z = router_z_loss(record(logits, indices), mask=mask)
    stats = routing_statistics(record(logits, indices), mask=mask)["layers.0.mlp"]

    changed_logits, changed_indices = logits.clone(), indices.clone()
    padding = mask == 0
    changed_logits[padding] = torch.randn(int(padding.sum()), 4) * 10
    changed_indices[padding] = torch.tensor([3, 2])
    for scope in ("batch", "sample"):
        assert torch.equal(
            load_balance_loss(record(changed_logits, changed_indices), mask=mask, scope=scope),
            load_balance_loss(record(logits, indices), mask=mask, scope=scope),
        )
    assert torch.equal(router_z_loss(record(changed_logits, changed_indices), mask=mask), z)
    changed_stats = routing_statistics(record(changed_logits, changed_indices), mask=mask)["layers.0.mlp"]
    assert torch.equal(changed_stats.load, stats.load) and changed_stats.entropy == stats.entropy
    # ... while without the mask the padding does count
    assert not torch.equal(load_balance_loss(record(changed_logits, changed_indices)), loss)
    # a bool mask works like a 0/1 mask
    assert torch.equal(load_balance_loss(record(logits, indices), mask=mask.bool()), loss)


def hand_balance(probs: list[list[float]], choices: list[int], num_experts: int) -> float:
    """E * sum_e f_e * P_e for top-1 routing of the given tokens."""
    fraction = [sum(c == e for c in choices) / len(choices) for e in range(num_experts)]
    mean_prob = [sum(p[e] for p in probs) / len(probs) for e in range(num_experts)]
    return num_experts * sum(f * p for f, p in zip(fraction, mean_prob, strict=True))


def test_per_sample_scope_differs_from_batch_scope_and_matches_hand_computation():
    # sample 0 sends both tokens to expert 0, sample 1 both to expert 1: balanced over the batch,
    # collapsed within each sample
    probs = [[[0.9, 0.1], [0.8, 0.2]], [[0.1, 0.9], [0.3, 0.7]]]
    choices = [[0, 0], [1, 1]]
    records = record(probs_to_logits(probs), torch.tensor(choices)[..., None])
    batch = load_balance_loss(records, scope="batch")
    sample = load_balance_loss(records, scope="sample")
    expected_batch = hand_balance(probs[0] + probs[1], choices[0] + choices[1], 2)
    expected_sample = (hand_balance(probs[0], choices[0], 2) + hand_balance(probs[1], choices[1], 2)) / 2
    assert expected_batch == pytest.approx(1.0) and expected_sample == pytest.approx(1.65)
    assert batch.item() == pytest.approx(expected_batch, rel=1e-6)
    assert sample.item() == pytest.approx(expected_sample, rel=1e-6)


def test_per_sample_scope_with_mask_and_an_empty_sample():
    probs = [[[0.9, 0.1], [0.8, 0.2], [0.4, 0.6]], [[0.1, 0.9], [0.3, 0.7], [0.5, 0.5]], [[0.5, 0.5]] * 3]
    choices = [[0, 0, 1], [1, 1, 0], [0, 1, 0]]
    mask = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 0, 0]])  # the third sample is all padding
    records = record(probs_to_logits(probs), torch.tensor(choices)[..., None])
    expected = (
        hand_balance([probs[0][0], probs[0][2]], [choices[0][0], choices[0][2]], 2)
        + hand_balance(probs[1][:2], choices[1][:2], 2)
    ) / 2
    assert load_balance_loss(records, mask=mask, scope="sample").item() == pytest.approx(expected, rel=1e-6)
    # no real token at all: zero loss, not NaN
    nothing = torch.zeros(3, 3)
    for scope in ("batch", "sample"):
        assert load_balance_loss(records, mask=nothing, scope=scope).item() == 0.0


def test_per_sample_scope_needs_a_batch_dimension():
    with pytest.raises(ValueError, match="layers.0.mlp"):
        load_balance_loss(record(torch.zeros(5, 4), torch.zeros(5, 1, dtype=torch.long)), scope="sample")


def test_load_balance_is_averaged_over_layers_and_zero_without_records():
    uniform = record(torch.zeros(1, 4, 2), torch.tensor([[[0], [1], [0], [1]]]), layer="a")
    collapsed_logits = torch.tensor([[[30.0, -30.0]] * 4])
    collapsed = record(collapsed_logits, torch.zeros(1, 4, 1, dtype=torch.long), layer="b")
    assert load_balance_loss({**uniform, **collapsed}).item() == pytest.approx((1.0 + 2.0) / 2, rel=1e-6)
    assert load_balance_loss({}).item() == 0.0 and router_z_loss({}).item() == 0.0


def test_load_balance_loss_is_differentiable_in_the_logits():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    load_balance_loss(record(logits, logits.detach().argmax(-1, keepdim=True))).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_z_loss_is_mean_squared_logsumexp_over_real_tokens():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 4) * 3
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    indices = logits.argmax(-1, keepdim=True)
    per_token = [
        [math.log(sum(math.exp(v) for v in logits[b, t].tolist())) ** 2 for t in range(3)] for b in range(2)
    ]
    all_tokens = sum(sum(row) for row in per_token) / 6
    real = [per_token[b][t] for b in range(2) for t in range(3) if mask[b, t]]
    assert router_z_loss(record(logits, indices)).item() == pytest.approx(all_tokens, rel=1e-5)
    assert router_z_loss(record(logits, indices), mask=mask).item() == pytest.approx(sum(real) / 4, rel=1e-5)
    # averaged over layers
    two = {**record(logits, indices, "a"), **record(logits * 0, indices, "b")}
    assert router_z_loss(two).item() == pytest.approx((all_tokens + math.log(4) ** 2) / 2, rel=1e-5)


def test_routing_statistics_on_a_hand_example():
    # 6 tokens (B=2, T=3), top-1 over E=4; expert 3 gets nothing
    indices = torch.tensor([[0, 0, 1], [0, 1, 2]])[..., None]
    logits = torch.full((2, 3, 4), -1e4)
    logits[0, 0] = 0.0  # uniform over 4 experts: entropy ln 4
    logits[0, 1, :2] = 0.0  # uniform over 2: ln 2
    logits[0, 2, 1] = 0.0  # one-hot: 0
    logits[1] = probs_to_logits([[0.7, 0.1, 0.1, 0.1]] * 3)
    stats = routing_statistics(record(logits, indices))["layers.0.mlp"]
    assert torch.allclose(stats.load, torch.tensor([3, 2, 1, 0]) / 6)
    assert stats.load.sum().item() == pytest.approx(1.0)
    assert stats.dead_experts == 1
    skewed = -(0.7 * math.log(0.7) + 3 * 0.1 * math.log(0.1))
    expected_entropy = (math.log(4) + math.log(2) + 0.0 + 3 * skewed) / 6
    assert stats.entropy == pytest.approx(expected_entropy, rel=1e-5)

    mask = torch.tensor([[1, 1, 1], [0, 0, 0]])  # only the first sample counts
    masked = routing_statistics(record(logits, indices), mask=mask)["layers.0.mlp"]
    assert torch.allclose(masked.load, torch.tensor([2, 1, 0, 0]) / 3)
    assert masked.dead_experts == 2
    assert masked.entropy == pytest.approx((math.log(4) + math.log(2)) / 3, rel=1e-5)


def test_routing_statistics_top2_load_counts_every_slot():
    indices = torch.tensor([[[0, 1], [0, 2], [0, 1]]])
    stats = routing_statistics(record(torch.zeros(1, 3, 3), indices))["layers.0.mlp"]
    assert torch.allclose(stats.load, torch.tensor([3, 2, 1]) / 6)
    assert stats.dead_experts == 0
    assert stats.entropy == pytest.approx(math.log(3), rel=1e-6)


@pytest.mark.parametrize("function", [load_balance_loss, router_z_loss, routing_statistics])
def test_mask_of_wrong_shape_names_the_layer(function):
    records = record(
        torch.zeros(2, 5, 4), torch.zeros(2, 5, 1, dtype=torch.long), layer="model.layers.1.mlp.up_proj"
    )
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj.*\(2, 5\)"):
        function(records, mask=torch.ones(2, 6))

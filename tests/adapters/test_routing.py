"""Routers (top-k weights, router gradient modes, jitter) and the routing collector side channel."""

import pytest
import torch
from torch import nn

from lightning_moe.adapters import (
    AdaptedLinear,
    AdapterRule,
    MoEConfig,
    RoutingCollector,
    RoutingRecord,
    inject,
    load_balance_loss,
    mixlora_rules,
    mole_rules,
    routing_collector,
)
from lightning_moe.adapters.lora_mixture import MixtureGate
from lightning_moe.adapters.moe import MoEAdapter
from lightning_moe.adapters.routing import TopKRouter
from tests.tolerances import assert_same_maths

IN_FEATURES, OUT_FEATURES, NUM_EXPERTS = 16, 10, 4


def make_router(top_k: int, gradient: str = "prob", jitter_noise: float = 0.0) -> TopKRouter:
    torch.manual_seed(0)
    return TopKRouter(IN_FEATURES, NUM_EXPERTS, top_k, gradient=gradient, jitter_noise=jitter_noise)


def make_moe(
    router_gradient: str = "prob", top_k: int = 1, dtype: torch.dtype = torch.float32, **kwargs
) -> MoEAdapter:
    torch.manual_seed(0)
    base = nn.Linear(IN_FEATURES, OUT_FEATURES, dtype=dtype)
    config = MoEConfig(
        rank=4, num_experts=NUM_EXPERTS, top_k=top_k, router_gradient=router_gradient, **kwargs
    )
    adapter = MoEAdapter(base, config)
    with torch.no_grad():
        adapter.experts.lora_B.normal_(std=0.3)
    return adapter


@pytest.mark.parametrize("top_k", [2, 3])
def test_top_k_weights_are_renormalised_chosen_probabilities(top_k):
    router = make_router(top_k)
    x = torch.randn(9, IN_FEATURES)
    indices, weights, logits = router(x)
    assert indices.shape == weights.shape == (9, top_k)
    assert logits.shape == (9, NUM_EXPERTS) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, router.gate(x))
    probs = logits.softmax(-1)
    torch.testing.assert_close(weights.sum(-1), torch.ones(9))
    chosen = probs.gather(-1, indices)
    torch.testing.assert_close(weights, chosen / chosen.sum(-1, keepdim=True))
    # the chosen experts are the most probable ones, best first
    torch.testing.assert_close(chosen, probs.sort(-1, descending=True).values[:, :top_k])


def test_top1_prob_weight_is_the_chosen_probability():
    router = make_router(1, "prob")
    x = torch.randn(9, IN_FEATURES)
    indices, weights, logits = router(x)
    probs = logits.softmax(-1)
    assert torch.equal(indices[:, 0], probs.argmax(-1))
    assert torch.equal(weights, probs.gather(-1, indices))
    assert (weights < 1).all()


def test_top1_straight_through_weight_is_exactly_one_with_probability_gradient():
    router = make_router(1, "straight_through")
    x = torch.randn(9, IN_FEATURES)
    indices, weights, logits = router(x)
    assert torch.equal(weights, torch.ones(9, 1))
    coefficients = torch.randn(9, 1)
    (weights * coefficients).sum().backward()
    straight_through_grad = router.gate.weight.grad.clone()
    assert straight_through_grad.abs().sum() > 0
    # the backward pass is that of the probability itself
    prob_router = make_router(1, "prob")
    _, prob_weights, _ = prob_router(x)
    (prob_weights * coefficients).sum().backward()
    torch.testing.assert_close(straight_through_grad, prob_router.gate.weight.grad)


@pytest.mark.parametrize("router_gradient", ["prob", "straight_through"])
def test_task_loss_alone_trains_the_top1_router(router_gradient):
    adapter = make_moe(router_gradient)
    x = torch.randn(2, 5, IN_FEATURES)
    projection = torch.randn(2, 5, OUT_FEATURES)
    (adapter(x) * projection).sum().backward()
    assert adapter.router.gate.weight.grad.abs().sum() > 0


def test_straight_through_and_prob_differ_in_output_but_share_the_router_gradient():
    # float64: scaling by the probability inside and outside the experts rounds differently
    x = torch.randn(2, 5, IN_FEATURES, dtype=torch.float64)
    projection = torch.randn(2, 5, OUT_FEATURES, dtype=torch.float64)
    results = {}
    for mode in ("prob", "straight_through"):
        adapter = make_moe(mode, dtype=torch.float64)
        out = adapter(x)
        (out * projection).sum().backward()
        indices, weights, logits = adapter.router(x.flatten(0, 1))
        results[mode] = (
            out.detach(),
            adapter.router.gate.weight.grad,
            logits.softmax(-1).gather(-1, indices),
        )
    prob_out, prob_gate_grad, chosen_prob = results["prob"]
    st_out, st_gate_grad, _ = results["straight_through"]
    # straight-through uses the unscaled expert output, prob scales it by the chosen probability
    assert_same_maths(prob_out, st_out * chosen_prob.view(2, 5, 1))
    assert_same_maths(prob_gate_grad, st_gate_grad)


@pytest.mark.parametrize(
    ("dtype", "expected"), [(torch.bfloat16, torch.float32), (torch.float64, torch.float64)]
)
def test_routers_and_gates_compute_in_at_least_fp32(dtype, expected):
    router = make_router(2).to(dtype)
    _, weights, logits = router(torch.randn(9, IN_FEATURES, dtype=dtype))
    assert logits.dtype == weights.dtype == expected
    gate = MixtureGate(IN_FEATURES, NUM_EXPERTS, hidden=8, dtype=dtype)
    assert gate(torch.randn(9, IN_FEATURES, dtype=dtype)).dtype == expected


def test_jitter_noise_only_in_training():
    router = make_router(1, jitter_noise=0.5)
    x = torch.randn(9, IN_FEATURES)
    router.eval()
    _, _, eval_logits = router(x)
    assert torch.equal(eval_logits, router.gate(x))
    assert torch.equal(router(x)[2], eval_logits)
    router.train()
    torch.manual_seed(1)
    first = router(x)[2]
    second = router(x)[2]
    assert not torch.allclose(first, eval_logits) and not torch.allclose(first, second)
    # multiplicative noise of at most +-50% on every input feature
    noise_free = router.gate(x)
    assert ((first - noise_free).abs() <= 0.5 * x.abs() @ router.gate.weight.abs().T + 1e-5).all()


def test_collector_records_only_inside_capture_with_input_leading_shape(make_llama, input_ids):
    model = make_llama()
    report = inject(
        model, mixlora_rules(num_experts=4, top_k=2, rank=4, mlp_targets=["mlp.up_proj", "mlp.down_proj"])
    )
    collector = report.collector
    assert routing_collector(model) is collector
    with torch.no_grad():
        model(input_ids)
    assert collector.records == {}

    with collector.capture() as records, torch.no_grad():
        model(input_ids)
    moe_layers = sorted(name for name, kind in report.adapted.items() if kind == "moe")
    assert (
        sorted(records)
        == moe_layers
        == [f"model.layers.{i}.mlp.{proj}" for i in range(2) for proj in ("down_proj", "up_proj")]
    )
    for name, record in records.items():
        assert isinstance(record, RoutingRecord) and record.layer == name
        assert record.logits.shape == (2, 7, 4) and record.indices.shape == (2, 7, 2)
        assert record.num_experts == 4 and record.top_k == 2

    captured = dict(records)
    with torch.no_grad():
        model(input_ids[:1])  # outside capture again: nothing changes
    assert collector.records == captured and not collector.active


def test_rerunning_a_layer_replaces_its_record():
    adapter = make_moe()
    adapter.layer_name = "mlp"
    adapter.collector = RoutingCollector()
    x1, x2 = torch.randn(3, 4, IN_FEATURES), torch.randn(3, 4, IN_FEATURES)
    with adapter.collector.capture() as records:
        adapter(x1)
        adapter(x2)
    assert list(records) == ["mlp"]
    torch.testing.assert_close(records["mlp"].logits, adapter.router.gate(x2))
    with adapter.collector.capture() as fresh:  # a new capture starts empty
        pass
    assert fresh == {}


def test_captured_logits_carry_the_aux_loss_gradient_to_every_router(make_llama, input_ids):
    model = make_llama()
    report = inject(model, mole_rules(num_experts=3, rank=4))
    with report.collector.capture() as records:
        model(input_ids)
    load_balance_loss(records).backward()
    routers = [m.adapter.router for m in model.modules() if isinstance(m, AdaptedLinear)]
    assert len(routers) == 6
    for router in routers:
        assert router.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("router_gradient", ["prob", "straight_through"])
def test_task_loss_gives_router_gradients_in_a_model(make_llama, input_ids, randomize, router_gradient):
    model = make_llama()
    rules = [
        AdapterRule(
            targets=["mlp.gate_proj", "mlp.down_proj"],
            adapter=MoEConfig(rank=4, num_experts=3, router_gradient=router_gradient),
        )
    ]
    inject(model, rules)
    randomize(model)
    out = model(input_ids, labels=input_ids)
    out.loss.backward()
    for module in model.modules():
        if isinstance(module, AdaptedLinear):
            assert module.adapter.router.gate.weight.grad.abs().sum() > 0

"""Modality-aware MoE routing (restricted or biased by each token's modality), router input
normalisation and init scale, experts started from trained LoRAs, and a check that routers
separate two domains where one low-rank update cannot serve both."""

import shutil

import pytest
import torch
from torch import nn

from lightning_moe.adapters import AdapterRule, LoraConfig, MoEConfig, inject, load_adapter, save_adapter
from lightning_moe.adapters.errors import AdapterCheckpointError, AdapterConfigError
from lightning_moe.adapters.moe import MoEAdapter
from lightning_moe.adapters.routing import (
    BLOCKED_LOGIT,
    MODALITIES,
    RoutingCollector,
    TokenModalities,
    TopKRouter,
)
from lightning_moe.routing_logging import mutual_information

TEXT, IMAGE, AUDIO = (MODALITIES.index(m) for m in ("text", "image", "audio"))


def routed_moe(**options) -> tuple[MoEAdapter, RoutingCollector]:
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    adapter = MoEAdapter(base, MoEConfig(rank=2, num_experts=4, top_k=1, **options))
    collector = RoutingCollector()
    adapter.bind_routing("layer", collector)
    return adapter, collector


def chosen_experts(adapter: MoEAdapter, collector: RoutingCollector, x: torch.Tensor, marked=None):
    with collector.capture() as records:
        if marked is None:
            adapter(x)
        else:
            with collector.modalities(marked):
                adapter(x)
    return records["layer"]


def test_restricted_routing_sends_each_modality_only_to_its_own_and_shared_experts():
    adapter, collector = routed_moe(expert_modalities=["image", "image", "text", "shared"])
    x = torch.randn(3, 20, 8)
    tokens = torch.randint(0, 2, (3, 20))  # text or image per token
    record = chosen_experts(adapter, collector, x, TokenModalities(tokens, torch.zeros(3, dtype=torch.long)))
    chosen = record.indices[..., 0]
    assert set(chosen[tokens == IMAGE].tolist()) <= {0, 1, 3}
    assert set(chosen[tokens == TEXT].tolist()) <= {2, 3}
    assert (chosen[tokens == IMAGE] != 3).any()  # image tokens do use their own experts
    # blocked experts get exactly zero probability, and the weight is the allowed softmax
    probs = record.logits.softmax(-1)
    assert torch.all(probs[tokens == TEXT][:, :2] == 0)
    allowed = record.logits[tokens == TEXT][:, 2:].softmax(-1)
    torch.testing.assert_close(probs[tokens == TEXT][:, 2:], allowed)


def test_unmarked_tokens_are_text_and_generated_tokens_take_the_continuation_modality():
    adapter, collector = routed_moe(expert_modalities=["image", "image", "text", "text"])
    x = torch.randn(2, 5, 8)
    assert set(chosen_experts(adapter, collector, x).indices.flatten().tolist()) <= {2, 3}
    prompt = TokenModalities(torch.zeros(2, 5, dtype=torch.long), torch.tensor([IMAGE, TEXT]))
    step = chosen_experts(adapter, collector, torch.randn(2, 1, 8), prompt).indices[:, 0, 0]
    assert step[0].item() in {0, 1} and step[1].item() in {2, 3}
    with pytest.raises(ValueError, match="do not fit"):
        chosen_experts(adapter, collector, torch.randn(3, 5, 8), prompt)


def test_biased_routing_adds_the_bonus_to_own_and_shared_experts_only():
    plain, collector = routed_moe()
    biased, biased_collector = routed_moe(
        expert_modalities=["image", "text", "audio", "shared"], modality_routing="bias", modality_bias=1.5
    )
    biased.router.load_state_dict(plain.router.state_dict())
    x = torch.randn(2, 6, 8)
    tokens = torch.tensor([[TEXT, IMAGE, AUDIO] * 2] * 2)
    marked = TokenModalities(tokens, torch.zeros(2, dtype=torch.long))
    before = chosen_experts(plain, collector, x).logits
    after = chosen_experts(biased, biased_collector, x, marked).logits
    expected_bonus = torch.tensor([[0, 1.5, 0, 1.5], [1.5, 0, 0, 1.5], [0, 0, 1.5, 1.5]])[tokens]
    torch.testing.assert_close(after - before, expected_bonus)


def test_a_modality_without_own_or_shared_experts_routes_over_all():
    config = MoEConfig(rank=2, num_experts=2, top_k=1, expert_modalities=["image", "image"])
    assert config.allowed_experts()[TEXT] == [True, True]
    adapter, _ = routed_moe(expert_modalities=["image", "image", "image", "image"])
    assert torch.all(adapter.modality_logit_bias[TEXT] == 0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"expert_modalities": ["image", "text"]}, "one entry per expert"),
        ({"expert_modalities": ["image", "video", "text", "text"]}, "unknown modality 'video'"),
        ({"expert_modalities": ["image", "text", "text", "text"], "top_k": 2}, "image tokens may use 1"),
        ({"expert_init": [None]}, "one entry per expert"),
        ({"router_init_std": 0.0}, "router_init_std must be > 0"),
        ({"expert_init": [None] * 4, "init": "eva"}, "cannot be combined with init='eva'"),
    ],
)
def test_bad_modality_and_router_settings_are_refused(options, message):
    with pytest.raises(AdapterConfigError, match=message):
        MoEConfig(rank=2, num_experts=4, **({"top_k": 1} | options))


def test_router_input_norm_makes_the_logits_scale_invariant_and_init_std_sets_the_gate():
    torch.manual_seed(0)
    router = TopKRouter(64, 4, 1, input_norm=True, init_std=0.5)
    assert router.gate.weight.std().item() == pytest.approx(0.5, rel=0.15)
    x = torch.randn(10, 64) * 1e-3  # a down_proj's tiny input
    _, _, small = router(x)
    _, _, large = router(x * 1e3)
    torch.testing.assert_close(small, large, rtol=1e-4, atol=1e-4)
    rms = x.square().mean(-1, keepdim=True).add(1e-12).rsqrt()
    torch.testing.assert_close(small, router.gate(x * rms))


def test_blocked_logits_keep_entropy_and_z_loss_finite():
    from lightning_moe.adapters import router_z_loss, routing_statistics

    adapter, collector = routed_moe(expert_modalities=["image", "image", "text", "text"])
    record = chosen_experts(adapter, collector, torch.randn(2, 4, 8))
    assert torch.all(record.logits[..., :2] < BLOCKED_LOGIT / 2)
    stats = routing_statistics({"layer": record})
    assert torch.isfinite(torch.tensor(stats["layer"].entropy))
    assert torch.isfinite(router_z_loss({"layer": record}))


def test_experts_start_from_the_given_lora_folders(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6))
    reference = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6))
    reference.load_state_dict(model.state_dict())
    lora_rules = [AdapterRule(targets=["0", "2"], adapter=LoraConfig(rank=2, alpha=4))]
    inject(reference, lora_rules)
    with torch.no_grad():
        for parameter in reference.parameters():
            if parameter.requires_grad:
                parameter.normal_(std=0.3)
    save_adapter(reference, lora_rules, tmp_path / "text_lora", base_model="tiny")

    moe = MoEConfig(
        rank=4,  # larger than the LoRA's: padded with zeros
        alpha=4,
        num_experts=2,
        top_k=1,
        expert_modalities=["image", "text"],
        expert_init=[None, str(tmp_path / "text_lora")],
    )
    report = inject(model, [AdapterRule(targets=["0", "2"], adapter=moe)])
    x = torch.randn(5, 8)
    # unmarked tokens are text, restricted to expert 1 with probability exactly 1
    torch.testing.assert_close(model(x), reference(x))
    assert report.collector is not None
    assert torch.all(model[0].adapter.experts.lora_B[0] == 0)  # expert 0 kept its fresh start

    # the saved mixture loads without its source folders: saved weights replace the start
    save_adapter(
        model, [AdapterRule(targets=["0", "2"], adapter=moe)], tmp_path / "unified", base_model="tiny"
    )
    shutil.rmtree(tmp_path / "text_lora")
    fresh = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6))
    fresh.load_state_dict(
        {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "adapter" not in k}
    )
    load_adapter(fresh, tmp_path / "unified")
    torch.testing.assert_close(fresh(x), reference(x))
    with pytest.raises(AdapterCheckpointError, match="text_lora"):
        inject(
            nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6)),
            [AdapterRule(targets=["0"], adapter=moe)],
        )

    save_adapter(reference, lora_rules, tmp_path / "text_lora", base_model="tiny")
    small = MoEConfig(rank=1, num_experts=2, top_k=1, expert_init=[str(tmp_path / "text_lora"), None])
    fresh = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6))
    with pytest.raises(AdapterCheckpointError, match="rank 2, more than the experts' rank=1"):
        inject(fresh, [AdapterRule(targets=["0", "2"], adapter=small)])
    wrong = nn.Sequential(nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 6))
    with pytest.raises(AdapterCheckpointError, match="text_lora"):
        inject(wrong, [AdapterRule(targets=["0", "2"], adapter=moe)])


def test_mutual_information_of_hand_built_tables():
    assert mutual_information(torch.tensor([[10.0, 0.0], [0.0, 10.0]])) == pytest.approx(1.0)
    assert mutual_information(torch.tensor([[5.0, 5.0], [5.0, 5.0]])) == pytest.approx(0.0)
    assert mutual_information(torch.tensor([[6.0, 2.0], [2.0, 6.0]])) == pytest.approx(
        1 - (-(0.75 * torch.log2(torch.tensor(0.75)) + 0.25 * torch.log2(torch.tensor(0.25)))).item()
    )
    assert mutual_information(torch.zeros(2, 3)) == 0.0


def conflicting_domains(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs of two domains (told apart by feature 0) whose targets need opposite rank-2
    updates of the base: delta(x) = +D x in domain 0 and -D x in domain 1. No single linear
    update fits both, so an adapter does well only if it treats the domains differently."""
    generator = torch.Generator().manual_seed(seed)
    domain = torch.randint(0, 2, (count,), generator=generator)
    x = torch.randn(count, 16, generator=generator)
    x[:, 0] = torch.where(domain == 0, 2.0, -2.0)
    update = torch.randn(16, 2, generator=torch.Generator().manual_seed(99)) @ torch.randn(
        2, 16, generator=torch.Generator().manual_seed(98)
    )
    sign = torch.where(domain == 0, 1.0, -1.0)[:, None]
    return x, sign * (x @ update.T) * 0.3, domain


def fit_delta(adapter: nn.Module, steps: int, router_lr: float | None = None) -> float:
    """Train the adapter's delta on the conflicting domains; returns the held-out mean squared error."""
    x, target, _ = conflicting_domains(512, seed=0)
    routers = [p for n, p in adapter.named_parameters() if n.startswith("router.")]
    others = [p for n, p in adapter.named_parameters() if not n.startswith("router.")]
    groups = [{"params": others}] + ([{"params": routers, "lr": router_lr}] if routers else [])
    optimizer = torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(adapter(x), target).backward()
        optimizer.step()
    x, target, _ = conflicting_domains(512, seed=1)
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(adapter(x), target))


def test_routers_separate_two_domains_whose_targets_conflict():
    from lightning_moe.adapters import LoraAdapter

    torch.manual_seed(0)
    base = nn.Linear(16, 16)
    lora = LoraAdapter(base, LoraConfig(rank=4, alpha=4))  # as many parameters as the two experts
    lora_error = fit_delta(lora, steps=300)
    torch.manual_seed(0)
    moe = MoEAdapter(base, MoEConfig(rank=2, alpha=2, num_experts=2, top_k=1, router_norm=True))
    collector = RoutingCollector()
    moe.bind_routing("layer", collector)
    moe_error = fit_delta(moe, steps=300, router_lr=5e-2)

    x, target, domain = conflicting_domains(512, seed=1)
    with collector.capture() as records, torch.no_grad():
        moe(x)
    chosen = records["layer"].indices[:, 0]
    counts = torch.zeros(2, 2)
    counts.index_put_((domain, chosen), torch.ones(len(domain)), accumulate=True)
    assert mutual_information(counts) > 0.9  # of at most 1 bit: each domain has its own expert
    zero_error = float(target.square().mean())
    assert lora_error > 0.5 * zero_error  # one linear update cannot serve both domains
    assert moe_error < 0.1 * lora_error

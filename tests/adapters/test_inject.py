"""inject(): target matching, per-rule adapter kinds, freezing, real model families, loud errors."""

import pytest
import torch
from torch import nn

from lightning_moe.adapters import (
    AdaptedLinear,
    AdapterConfigError,
    AdapterRule,
    LoraConfig,
    MoEConfig,
    adapted_layers,
    inject,
    mixlora_rules,
    mole_rules,
    routing_collector,
)
from lightning_moe.adapters.lora import LoraAdapter
from lightning_moe.adapters.moe import MoEAdapter
from tests.tolerances import assert_same_maths


def adapter_parameter_names(model: nn.Module) -> set[str]:
    return {
        f"{name}.adapter.{param_name}"
        for name, layer in adapted_layers(model)
        for param_name, _ in layer.adapter.named_parameters()
    }


def assert_only_adapters_train(model: nn.Module, report) -> None:
    """Base frozen (no grad at all), every adapter trainable; the report counts the same."""
    adapter_names = adapter_parameter_names(model)
    assert adapter_names
    trainable = 0
    for name, parameter in model.named_parameters():
        if name in adapter_names:
            assert parameter.requires_grad, name
            trainable += parameter.numel()
        else:
            assert not parameter.requires_grad, name
            assert parameter.grad is None, name
    assert report.trainable_parameters == trainable
    assert report.total_parameters == sum(p.numel() for p in model.parameters())


def assert_adapters_received_gradients(model: nn.Module) -> None:
    for name, layer in adapted_layers(model):
        if isinstance(layer.adapter, LoraAdapter):
            assert layer.adapter.lora_B.grad.abs().sum() > 0, name
        else:
            assert layer.adapter.experts.lora_B.grad.abs().sum() > 0, name


def test_suffix_and_regex_rules_with_a_kind_per_rule(make_llama, input_ids):
    model = make_llama()
    with torch.no_grad():
        expected = model(input_ids).logits
    rules = [
        AdapterRule(
            targets=["mlp.up_proj", "mlp.down_proj"], adapter=MoEConfig(rank=4, num_experts=3, top_k=2)
        ),
        AdapterRule(
            targets=[r"model\.layers\.\d+\.self_attn\.(q|v)_proj"],
            adapter=LoraConfig(rank=2, alpha=4),
            regex=True,
        ),
    ]
    report = inject(model, rules)
    assert report.adapted == {
        **{f"model.layers.{i}.mlp.{p}": "moe" for i in range(2) for p in ("up_proj", "down_proj")},
        **{f"model.layers.{i}.self_attn.{p}": "lora" for i in range(2) for p in ("q_proj", "v_proj")},
    }
    layers = dict(adapted_layers(model))
    assert set(layers) == set(report.adapted)
    for name, kind in report.adapted.items():
        assert isinstance(layers[name].adapter, MoEAdapter if kind == "moe" else LoraAdapter)
        assert isinstance(layers[name].base_layer, nn.Linear) and not isinstance(
            layers[name].base_layer, AdaptedLinear
        )
    attention = model.model.layers[0].self_attn
    assert type(attention.k_proj) is nn.Linear and type(attention.o_proj) is nn.Linear
    assert type(model.model.layers[1].mlp.gate_proj) is nn.Linear
    assert layers["model.layers.0.self_attn.q_proj"].adapter.lora_A.shape == (2, 32)
    assert layers["model.layers.1.mlp.down_proj"].adapter.experts.lora_A.shape == (3, 4, 64)
    assert "adapted 8 linear layers (lora, moe)" in report.summary()
    assert routing_collector(model) is report.collector

    out = model(input_ids, labels=input_ids)
    assert torch.equal(out.logits, expected)  # B = 0 at init: exactly the base model
    out.loss.backward()
    assert_only_adapters_train(model, report)
    assert_adapters_received_gradients(model)


@pytest.mark.parametrize("training", [False, True])
def test_new_adapters_follow_the_model_mode(make_llama, input_ids, training):
    model = make_llama().train(training)
    inject(model, [AdapterRule(targets=["q_proj"], adapter=LoraConfig(rank=2, dropout=0.5))])
    assert all(m.training == training for m in model.modules())
    if not training:  # an eval-mode model stays deterministic: no adapter dropout
        with torch.no_grad():
            for _, layer in adapted_layers(model):
                layer.adapter.lora_B.normal_()
            assert torch.equal(model(input_ids).logits, model(input_ids).logits)


def test_freeze_base_false_leaves_the_base_trainable(make_llama):
    model = make_llama()
    report = inject(model, [AdapterRule(targets=["q_proj"], adapter=LoraConfig(rank=2))], freeze_base=False)
    assert all(p.requires_grad for p in model.parameters())
    assert report.trainable_parameters == report.total_parameters


def test_recipe_rules_on_llama(make_llama):
    mole = make_llama()
    report = inject(mole, mole_rules(num_experts=2, rank=4))
    assert sorted(set(report.adapted.values())) == ["moe"] and len(report.adapted) == 6
    assert all(layer.adapter.router.top_k == 1 for _, layer in adapted_layers(mole))

    mix = make_llama()
    report = inject(mix, mixlora_rules(num_experts=4, top_k=2, rank=4))
    kinds = report.adapted
    assert [kinds[f"model.layers.0.mlp.{p}"] for p in ("gate_proj", "up_proj", "down_proj")] == ["moe"] * 3
    assert [kinds[f"model.layers.1.self_attn.{p}_proj"] for p in "qkvo"] == ["lora"] * 4
    assert routing_collector(mix) is report.collector


def test_lora_only_model_has_no_routing_collector(make_llama):
    model = make_llama()
    inject(model, [AdapterRule(targets=["q_proj"], adapter=LoraConfig(rank=2))])
    assert routing_collector(model) is None


def test_open_clip_mlp_linears(make_clip):
    model = make_clip().double()
    torch.manual_seed(0)
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    text = torch.randint(0, 64, (2, 8))
    # attention picks its kernel by whether anything needs a gradient (rounding differs between
    # kernels), so the reference is the frozen base, compared under no_grad on both sides; the
    # forward with gradients is compared in float64 (see assert_same_maths)
    model.requires_grad_(False)
    with torch.no_grad():
        expected_image, expected_text, _ = model(images, text)
    rules = [
        AdapterRule(
            targets=[r"visual\.transformer\.resblocks\.\d+\.mlp\.c_fc"],
            adapter=MoEConfig(rank=4, num_experts=3),
            regex=True,
        ),
        AdapterRule(
            targets=[r"transformer\.resblocks\.\d+\.mlp\.c_fc"], adapter=LoraConfig(rank=4), regex=True
        ),
        AdapterRule(targets=["mlp.c_proj"], adapter=LoraConfig(rank=4)),
    ]
    report = inject(model, rules)
    assert report.adapted == {
        "visual.transformer.resblocks.0.mlp.c_fc": "moe",
        "transformer.resblocks.0.mlp.c_fc": "lora",
        "visual.transformer.resblocks.0.mlp.c_proj": "lora",
        "transformer.resblocks.0.mlp.c_proj": "lora",
    }
    with torch.no_grad():
        image_features, text_features, _ = model(images, text)
    assert torch.equal(image_features, expected_image) and torch.equal(text_features, expected_text)
    with report.collector.capture() as records:
        image_features, text_features, logit_scale = model(images, text)
    assert_same_maths(image_features, expected_image)
    # ViT tokens: 1 class token + (16 / 8)^2 patches per image
    assert records["visual.transformer.resblocks.0.mlp.c_fc"].logits.shape == (2, 5, 3)
    logits = logit_scale * image_features @ text_features.T
    torch.nn.functional.cross_entropy(logits, torch.arange(2)).backward()
    assert_only_adapters_train(model, report)
    assert_adapters_received_gradients(model)


def test_diffusers_unet_attention_and_feed_forward_linears(make_unet):
    model = make_unet()
    torch.manual_seed(0)
    sample = torch.randn(2, 4, 16, 16)
    timesteps = torch.tensor([1, 500])
    context = torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = model(sample, timesteps, encoder_hidden_states=context).sample
    targets = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
    report = inject(model, [AdapterRule(targets=targets, adapter=LoraConfig(rank=4, alpha=4))])
    # 4 transformer blocks (down, mid, 2 up), each with 2 attentions x 4 linears + 2 feed-forward linears
    assert len(report.adapted) == 4 * (2 * 4 + 2)
    assert "mid_block.attentions.0.transformer_blocks.0.attn2.to_k" in report.adapted
    assert model.mid_block.attentions[0].transformer_blocks[0].attn2.to_k.adapter.lora_A.shape == (4, 32)
    out = model(sample, timesteps, encoder_hidden_states=context).sample
    assert torch.equal(out, expected)
    out.square().mean().backward()
    assert_only_adapters_train(model, report)
    assert_adapters_received_gradients(model)


def _untouched(model: nn.Module) -> bool:
    return not any(isinstance(m, AdaptedLinear) for m in model.modules()) and all(
        p.requires_grad for p in model.parameters()
    )


def test_pattern_matching_nothing_names_the_pattern(make_llama):
    model = make_llama()
    rules = [
        AdapterRule(targets=["q_proj"], adapter=LoraConfig(rank=2)),
        AdapterRule(targets=["mlp.upproj"], adapter=LoraConfig(rank=2)),
    ]
    with pytest.raises(
        AdapterConfigError, match=r"'mlp\.upproj' matched no module of LlamaForCausalLM.*q_proj"
    ):
        inject(model, rules)
    assert _untouched(model)
    with pytest.raises(AdapterConfigError, match=r"'q_proj' matched no module"):  # a regex must match fully
        inject(model, [AdapterRule(targets=["q_proj"], adapter=LoraConfig(rank=2), regex=True)])
    assert _untouched(model)


def test_non_linear_match_is_refused(make_llama):
    model = make_llama()
    with pytest.raises(AdapterConfigError, match=r"'mlp'.*'model\.layers\.0\.mlp', a LlamaMLP.*nn\.Linear"):
        inject(model, [AdapterRule(targets=["mlp"], adapter=LoraConfig(rank=2))])
    assert _untouched(model)


def test_two_rules_claiming_one_module(make_llama):
    model = make_llama()
    rules = [
        AdapterRule(targets=["self_attn.q_proj"], adapter=LoraConfig(rank=2)),
        AdapterRule(
            targets=[r".*\.0\.self_attn\.q_proj"], adapter=MoEConfig(rank=2, num_experts=2), regex=True
        ),
    ]
    with pytest.raises(
        AdapterConfigError,
        match=r"'model\.layers\.0\.self_attn\.q_proj' is matched by both 'self_attn\.q_proj' and '\.\*\\\\\.0",
    ):
        inject(model, rules)
    assert _untouched(model)


def test_injecting_twice_into_one_layer_is_refused(make_llama):
    model = make_llama()
    inject(model, [AdapterRule(targets=["q_proj"], adapter=LoraConfig(rank=2))])
    with pytest.raises(AdapterConfigError, match="already has an adapter"):
        inject(model, [AdapterRule(targets=["model.layers.0.self_attn.q_proj"], adapter=LoraConfig(rank=2))])


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: LoraConfig(rank=0), "rank=0"),
        (lambda: LoraConfig(rank=-3), "rank=-3"),
        (lambda: MoEConfig(rank=0, num_experts=2), "rank=0"),
        (lambda: MoEConfig(num_experts=2, top_k=3), "top_k=3"),
        (lambda: MoEConfig(num_experts=2, top_k=0), "top_k=0"),
        (lambda: MoEConfig(num_experts=0, top_k=1), "num_experts=0"),
        (lambda: LoraConfig(dropout=1.0), "dropout=1.0"),
        (lambda: MoEConfig(jitter_noise=-0.1), "jitter_noise=-0.1"),
        (lambda: MoEConfig(num_experts=4, top_k=2, router_gradient="straight_through"), "top_k=2"),
        (lambda: MoEConfig(init="pissa"), "pissa"),
        (lambda: mixlora_rules(top_k=1), "top_k=1"),
        (lambda: AdapterRule(targets=[], adapter=LoraConfig()), "targets=\\[\\]"),
    ],
)
def test_config_errors_name_the_bad_value(build, message):
    with pytest.raises(AdapterConfigError, match=message):
        build()


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_moe_expert_init(init):
    torch.manual_seed(0)
    base = nn.Linear(256, 8)
    experts = MoEAdapter(base, MoEConfig(rank=4, num_experts=3, init=init)).experts
    assert torch.count_nonzero(experts.lora_B) == 0
    if init == "gaussian":
        assert experts.lora_A.std().item() == pytest.approx(1 / 4, rel=0.1)
    else:
        assert experts.lora_A.abs().max().item() <= 1 / 16
    assert not torch.equal(experts.lora_A[0], experts.lora_A[1])  # every expert gets its own draw

"""The 4-bit frozen base (NF4) and LQ-LoRA's Q + L split: against a model holding the
dequantised weights in plain linears, for every adapter kind."""

import pytest
import torch
from torch import nn

from lightning_moe.adapters import (
    ADAPTER_KINDS,
    AdapterCheckpointError,
    AdapterConfigError,
    AdapterRule,
    CodyraConfig,
    DenseConfig,
    DyLoraConfig,
    LoraConfig,
    MeteoraConfig,
    MoEConfig,
    MoraConfig,
    TaskMoEConfig,
    XLoraConfig,
    adapted_layers,
    inject,
    load_adapter,
    merge_adapters,
    save_adapter,
)
from lightning_moe.adapters.adapter_folder import (
    BASE_OFFSETS_FILE,
    adapter_state_dict,
    copy_adapter_tensors,
    read_base_offsets,
)
from lightning_moe.adapters.quantized import (
    QuantizeConfig,
    QuantizedEmbedding,
    QuantizedLinear,
    base_bytes,
    dequantized_rows,
    lq_decompose,
    nf4,
    quantize_base,
    quantized_layers,
)
from tests.tolerances import assert_same_maths

NF4 = QuantizeConfig()
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def quantized_llama(make_llama, dtype=torch.float64, offsets=None):
    model = make_llama(dtype=dtype)
    quantize_base(model, NF4, offsets)
    return model


def dequantised_reference(make_llama, quantized_model, dtype=torch.float64):
    """The same base with plain linears holding the quantised model's dequantised weights (plus
    LQ-LoRA's low-rank part, where it has one)."""
    model = make_llama(dtype=dtype)
    with torch.no_grad():
        for name, module in quantized_model.named_modules():
            if isinstance(module, QuantizedLinear):
                linear = model.get_submodule(name.removesuffix(".base_layer"))
                linear.weight.copy_(module.dequantized_weight())
                if module.quantization["low_rank"]:
                    linear.weight.add_(module.offset())
    return model


def test_nf4_levels_blocks_and_bytes():
    weight = torch.randn(64, 256)
    quantized = nf4(weight, 64, 256)
    levels = quantized.nf4
    assert levels.numel() == 16 and levels.min() == -1 and levels.max() == 1
    # every value is a level times its block's (double-quantised) absmax scale
    blocks = quantized.get_original_weight().reshape(-1, 64)
    scales = blocks.abs().amax(1, keepdim=True)
    nearest = (blocks / scales).unsqueeze(-1).sub(levels).abs().amin(-1)
    assert nearest.max() < 1e-6
    # the scales come within int8 rounding of the true block absmax
    assert torch.allclose(scales.squeeze(1), weight.reshape(-1, 64).abs().amax(1), rtol=2e-2)
    layer = QuantizedLinear(nn.Linear(256, 64, bias=False), NF4)
    assert 0.125 < layer.stored_bytes() / (64 * 256 * 4) < 0.14  # 4 bits + int8 scales per 64


def test_quantize_base_skips_tied_and_skipped_linears(make_llama):
    model = make_llama()
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as SmolLM2's
    full = base_bytes(model)
    layers = quantize_base(model, QuantizeConfig(skip=[r"layers\.1\.mlp"]))
    assert "lm_head" not in layers and "model.layers.1.mlp.up_proj" not in layers
    assert len(layers) == 2 * 7 - 3 and all(
        not p.requires_grad for q in layers.values() for p in q.parameters()
    )
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantizedLinear)
    assert base_bytes(model) < full


CONFIGS = {
    "lora": [AdapterRule(targets=ALL, adapter=LoraConfig(rank=4, dropout=0.0))],
    "pissa": [AdapterRule(targets=["q_proj", "up_proj"], adapter=LoraConfig(rank=3, init="pissa"))],
    "moe": [AdapterRule(targets=["up_proj", "down_proj"], adapter=MoEConfig(rank=4, num_experts=3, top_k=2))],
    "task_moe": [
        AdapterRule(
            targets=["up_proj"], adapter=TaskMoEConfig(rank=4, num_experts=3, num_tasks=2, freeze_per_task=1)
        )
    ],
    "codyra": [AdapterRule(targets=["q_proj", "down_proj"], adapter=CodyraConfig(rank=4))],
    "mora": [AdapterRule(targets=["q_proj", "up_proj"], adapter=MoraConfig(rank=4, num_tasks=2))],
    "dylora": [AdapterRule(targets=["q_proj", "v_proj"], adapter=DyLoraConfig(rank=4))],
    "dense": [AdapterRule(targets=["o_proj"], adapter=DenseConfig())],
}


def mixture_rules(make_llama, randomize, tmp_path, kind):
    """X-LoRA / MeteoRA rules over two LoRA experts trained (randomised) on the quantised base,
    and the same rules over the same experts saved from the dequantised reference."""
    expert_rules = [AdapterRule(targets=["q_proj", "up_proj"], adapter=LoraConfig(rank=2))]
    folders = {"quantized": [], "reference": []}
    for seed in range(2):
        expert = quantized_llama(make_llama)
        reference = dequantised_reference(make_llama, expert)
        inject(expert, expert_rules)
        inject(reference, expert_rules)
        randomize(expert, seed=seed)
        copy_adapter_tensors(adapted_layers(reference), adapter_state_dict(expert), "the expert")
        for side, model in (("quantized", expert), ("reference", reference)):
            folders[side].append(str(save_adapter(model, expert_rules, tmp_path / f"{side}{seed}")))
    config = {"xlora": XLoraConfig, "meteora": MeteoraConfig}[kind]
    return {
        side: [AdapterRule(targets=["q_proj", "up_proj"], adapter=config(experts=paths, gate_hidden=8))]
        for side, paths in folders.items()
    }


def step(model, input_ids):
    model.zero_grad()
    logits = model(input_ids).logits
    logits.square().mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("kind", [*CONFIGS, "xlora", "meteora"])
def test_every_kind_on_nf4_equals_the_dequantised_reference(make_llama, input_ids, randomize, tmp_path, kind):
    if kind in CONFIGS:
        rules = reference_rules = CONFIGS[kind]
    else:
        sides = mixture_rules(make_llama, randomize, tmp_path, kind)
        rules, reference_rules = sides["quantized"], sides["reference"]
    quantized = quantized_llama(make_llama)
    reference = dequantised_reference(make_llama, quantized)
    inject(quantized, rules)
    inject(reference, reference_rules)
    randomize(quantized, seed=1)
    copy_adapter_tensors(adapted_layers(reference), adapter_state_dict(quantized), "the 4-bit model")
    logits, grads = step(quantized, input_ids)
    expected_logits, expected_grads = step(reference, input_ids)
    assert grads and set(grads) == set(expected_grads)
    assert_same_maths(logits, expected_logits)
    assert all(g.abs().sum() > 0 for name, g in expected_grads.items() if "lora_B" in name or "gate" in name)
    for name, grad in expected_grads.items():
        assert_same_maths(grads[name], grad, msg=name)
    # the base is really the 4-bit one, several per cent away from full precision
    bases = [m for m in quantized.modules() if isinstance(m, QuantizedLinear)]
    assert len(bases) == 14 and min(b.relative_error for b in bases) > 0.03


def test_every_kind_is_covered():
    # l4q quantises W + s B A itself and refuses a quantised base (tests/adapters/test_l4q.py)
    assert set(ADAPTER_KINDS) == {*CONFIGS, "xlora", "meteora", "l4q"} - {"pissa"}


def test_input_gradient_equals_the_dequantised_reference(make_llama):
    quantized = quantized_llama(make_llama)
    reference = dequantised_reference(make_llama, quantized)
    hidden = torch.randn(2, 5, 32, dtype=torch.float64)
    grads = []
    for model in (quantized, reference):
        x = hidden.clone().requires_grad_(True)
        model.model.layers[0].mlp(x).sum().backward()
        grads.append(x.grad)
    assert_same_maths(grads[0], grads[1])


def test_adapter_folder_records_and_checks_the_quantised_base(make_llama, randomize, tmp_path, input_ids):
    rules = CONFIGS["moe"]
    model = quantized_llama(make_llama)
    inject(model, rules)
    randomize(model, seed=2)
    folder = save_adapter(model, rules, tmp_path / "adapter")
    assert not (folder / BASE_OFFSETS_FILE).exists()
    stored = (folder / "adapter_model.safetensors").stat().st_size
    assert stored < sum(v.numel() * 8 for v in adapter_state_dict(model).values()) + 4096  # adapters only
    again = quantized_llama(make_llama)
    load_adapter(again, folder)
    assert torch.equal(again(input_ids).logits, model(input_ids).logits)
    with pytest.raises(AdapterCheckpointError, match=r"trained on a base stored as nf4 .* is not quantised"):
        load_adapter(make_llama(dtype=torch.float64), folder)
    full = make_llama(dtype=torch.float64)
    inject(full, rules)
    with pytest.raises(AdapterCheckpointError, match=r"not quantised; this model's .* is nf4"):
        load_adapter(quantized_llama(make_llama), save_adapter(full, rules, tmp_path / "full"))


def test_merging_into_a_quantised_base_is_refused(make_llama):
    model = quantized_llama(make_llama)
    inject(model, CONFIGS["lora"])
    with pytest.raises(AdapterConfigError, match="cannot merge a lora adapter into a 4-bit base layer"):
        merge_adapters(model)


def test_bad_quantize_settings_are_one_error(make_llama):
    with pytest.raises(AdapterConfigError, match="scheme must be one of"):
        QuantizeConfig(scheme="int3")
    with pytest.raises(AdapterConfigError, match="block_size must be a power of two"):
        QuantizeConfig(block_size=48)
    with pytest.raises(AdapterConfigError, match="float32 or bfloat16 base .* is float16"):
        quantize_base(make_llama(dtype=torch.float16), NF4)
    model = make_llama()
    with pytest.raises(
        AdapterConfigError,
        match=r"block_size=2048 does not divide the weight of 'model.layers.0.self_attn.q_proj' \(1024 values\)",
    ):
        quantize_base(model, QuantizeConfig(block_size=2048))
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())  # nothing changed
    with pytest.raises(AdapterConfigError, match="init 'lq_lora' .* set the model's `quantize`"):
        inject(make_llama(), [AdapterRule(targets=["q_proj"], adapter=LoraConfig(init="lq_lora"))])
    with pytest.raises(AdapterConfigError, match="init 'lora_ga' needs the full-weight gradient"):
        from lightning_moe.adapters.data_init import lora_ga_init

        model = quantized_llama(make_llama)
        inject(model, [AdapterRule(targets=["q_proj"], adapter=LoraConfig(init="lora_ga"))])
        lora_ga_init(model, dict(adapted_layers(model)), [], lambda batch: None)


# --- LQ-LoRA ----------------------------------------------------------------------------------
def test_lq_decompose_beats_plain_nf4_and_keeps_its_best_iterate():
    torch.manual_seed(0)
    # a weight with a strong low-rank part, as trained weights have
    weight = torch.randn(64, 128) * 0.02 + torch.randn(64, 4) @ torch.randn(4, 128) * 0.1
    plain = (weight - nf4(weight, 64, 128).get_original_weight()).norm() / weight.norm()
    a0, b0, errors = lq_decompose(weight, 4, NF4, iterations=4)
    q = nf4(weight - b0 @ a0, 64, 128).get_original_weight()
    achieved = (weight - q - b0 @ a0).norm() / weight.norm()
    assert achieved < 0.5 * plain
    assert achieved == pytest.approx(min(errors), rel=1e-3)
    assert a0.shape == (4, 128) and b0.shape == (64, 4)


def test_lq_decompose_weighting_lowers_the_weighted_error():
    torch.manual_seed(1)
    weight = torch.randn(64, 128)
    columns = torch.ones(128)
    columns[:8] = 30.0  # a few inputs carry most of the activation

    def weighted_error(a0, b0):
        q = nf4(weight - b0 @ a0, 64, 128).get_original_weight()
        return ((weight - q - b0 @ a0) * columns).norm()

    assert weighted_error(*lq_decompose(weight, 4, NF4, 3, columns)[:2]) < 0.8 * weighted_error(
        *lq_decompose(weight, 4, NF4, 3)[:2]
    )


def test_lq_lora_starts_at_q_plus_l_and_its_folder_rebuilds_q(make_llama, input_ids, tmp_path):
    rules = [AdapterRule(targets=ALL, adapter=LoraConfig(rank=4, alpha=8, init="lq_lora"))]
    plain = quantized_llama(make_llama)
    full = make_llama(dtype=torch.float64)
    offsets = {}
    for name, module in full.named_modules():
        if isinstance(plain.get_submodule(name), QuantizedLinear):
            a0, b0, _ = lq_decompose(module.weight, 4, NF4, 3)
            offsets[name] = (a0, b0)
    model = quantized_llama(make_llama, offsets=offsets)
    inject(model, rules)
    layer = model.get_submodule("model.layers.0.mlp.up_proj")
    assert layer.base_layer.relative_error < plain.get_submodule("model.layers.0.mlp.up_proj").relative_error
    # the start is Q + L exactly: the reference holds dequantised Q plus the offset
    reference = dequantised_reference(make_llama, model)
    assert_same_maths(model(input_ids).logits, reference(input_ids).logits)
    folder = save_adapter(model, rules, tmp_path / "lq")
    recorded = read_base_offsets(folder)
    assert set(recorded) == set(offsets)
    rebuilt = quantized_llama(make_llama, offsets=recorded)
    load_adapter(rebuilt, folder)
    assert torch.equal(rebuilt(input_ids).logits, model(input_ids).logits)
    with pytest.raises(AdapterCheckpointError, match="rank-4 LQ-LoRA part"):
        load_adapter(quantized_llama(make_llama), folder)


def test_quantized_embeddings_decode_rows_and_feed_the_tied_head(make_llama, input_ids, randomize):
    config = QuantizeConfig(block_size=32, embeddings=True)
    model = make_llama(dtype=torch.float64)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as SmolLM2's
    full = base_bytes(model)
    quantize_base(model, config)
    table = model.model.embed_tokens.weight
    assert model.lm_head.weight is table and isinstance(model.model.embed_tokens, QuantizedEmbedding)
    assert torch.equal(dequantized_rows(table, input_ids), table.get_original_weight()[input_ids])
    assert base_bytes(model) < 0.2 * full
    reference = make_llama(dtype=torch.float64)
    with torch.no_grad():
        reference.model.embed_tokens.weight.copy_(table.get_original_weight())
        reference.lm_head.weight = reference.model.embed_tokens.weight
        for name, module in model.named_modules():
            if isinstance(module, QuantizedLinear):
                reference.get_submodule(name).weight.copy_(module.dequantized_weight())
    rules = CONFIGS["lora"]
    inject(model, rules)
    inject(reference, rules)
    randomize(model, seed=4)
    copy_adapter_tensors(adapted_layers(reference), adapter_state_dict(model), "the 4-bit model")
    (logits, grads), (expected, expected_grads) = step(model, input_ids), step(reference, input_ids)
    assert_same_maths(logits, expected)
    for name, grad in expected_grads.items():
        assert_same_maths(grads[name], grad, msg=name)
    assert all(layer.quantization["embeddings"] for layer in quantized_layers(model).values())
    with pytest.raises(AdapterConfigError, match="block_size=64 does not divide the embedding width 32"):
        quantize_base(make_llama(), QuantizeConfig(embeddings=True))

"""PEFT interchange: import adapters written by peft itself, export ours so peft loads them."""

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

from lightning_moe.adapters import (
    AdapterCheckpointError,
    AdapterConfigError,
    AdapterRule,
    LoraConfig,
    MoEConfig,
    adapted_layers,
    export_peft,
    import_peft,
    inject,
    save_adapter,
)
from lightning_moe.adapters.adapter_folder import adapter_state_dict
from tests.tolerances import assert_same_maths

# peft and we compute the same LoRA maths through different code (and kernels); those comparisons
# run in float64 (see assert_same_maths)
F64 = torch.float64


def logits(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


def peft_lora_folder(make_llama, folder, seed: int = 0, dtype: torch.dtype = torch.float32, **config):
    """Make a LoRA with peft itself (on a base in `dtype`), give lora_B random values, save it as
    safetensors."""
    peft_model = peft.get_peft_model(make_llama().to(dtype), peft.LoraConfig(**config))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.2)
    peft_model.eval()
    peft_model.save_pretrained(str(folder), safe_serialization=True)
    assert (folder / "adapter_model.safetensors").is_file()
    return peft_model


@pytest.mark.parametrize(
    "config",
    [
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]},
        {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["q_proj", "down_proj"],
            "rank_pattern": {"down_proj": 6},
            "alpha_pattern": {"q_proj": 3.0},
            "lora_dropout": 0.1,
        },
        {"r": 5, "lora_alpha": 7, "target_modules": ["k_proj", "o_proj"], "use_rslora": True},
    ],
    ids=["plain", "rank_and_alpha_patterns", "rslora"],
)
def test_import_peft_reproduces_the_peft_model(make_llama, input_ids, tmp_path, config):
    folder = tmp_path / "peft"
    peft_model = peft_lora_folder(make_llama, folder, dtype=F64, **config)
    expected = logits(peft_model, input_ids)
    assert not torch.allclose(expected, logits(make_llama(dtype=F64), input_ids), atol=1e-4)

    ours = make_llama(dtype=F64)
    report = import_peft(ours, folder)
    assert set(report.adapted.values()) == {"lora"}
    peft_modules = {
        name.removeprefix("base_model.model.")
        for name, module in peft_model.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }
    assert set(report.adapted) == peft_modules
    for name, layer in adapted_layers(ours):
        peft_layer = peft_model.base_model.model.get_submodule(name)
        assert layer.adapter.scaling == peft_layer.scaling["default"], name
        assert layer.adapter.lora_A.shape == peft_layer.lora_A["default"].weight.shape
    assert_same_maths(logits(ours, input_ids), expected)
    assert all(not p.requires_grad for n, p in ours.named_parameters() if ".adapter." not in n)


def our_lora_model(make_llama, rules, seed: int = 0, dtype: torch.dtype = torch.float32):
    model = make_llama(dtype=dtype)
    inject(model, rules)
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            layer.adapter.lora_B.normal_(std=0.2)
    return model


MIXED_RULES = [
    AdapterRule(targets=["q_proj", "v_proj"], adapter=LoraConfig(rank=4, alpha=8)),
    AdapterRule(targets=["mlp.down_proj"], adapter=LoraConfig(rank=6, alpha=5)),
]
RSLORA_RULES = [
    AdapterRule(targets=["o_proj"], adapter=LoraConfig(rank=6, alpha=5, use_rslora=True)),
    AdapterRule(targets=["mlp.gate_proj"], adapter=LoraConfig(rank=3, alpha=2)),
]


@pytest.mark.parametrize("rules", [MIXED_RULES, RSLORA_RULES], ids=["two_ranks", "rslora"])
def test_export_loads_in_peft_with_the_same_outputs(make_llama, input_ids, tmp_path, rules):
    model = our_lora_model(make_llama, rules, dtype=F64)
    expected = logits(model, input_ids)
    folder = export_peft(model, tmp_path / "export", base_model_name_or_path="tiny-llama")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((folder / "adapter_config.json").read_text())
    ranks = {name: layer.adapter.lora_A.shape[0] for name, layer in adapted_layers(model)}
    assert config["r"] in ranks.values() and config["rank_pattern"] and not config["use_rslora"]
    assert {name: config["rank_pattern"].get(name, config["r"]) for name in ranks} == ranks

    peft_model = peft.PeftModel.from_pretrained(make_llama(dtype=F64), str(folder)).eval()
    for name, layer in adapted_layers(model):
        peft_layer = peft_model.base_model.model.get_submodule(name)
        assert peft_layer.r["default"] == ranks[name]
        assert peft_layer.scaling["default"] == pytest.approx(layer.adapter.scaling, rel=1e-15)
        assert torch.equal(peft_layer.lora_B["default"].weight, layer.adapter.lora_B)
    assert_same_maths(logits(peft_model, input_ids), expected)


def test_export_of_a_trained_pissa_adapter_loads_in_peft(make_llama, input_ids, tmp_path):
    model = make_llama(dtype=F64)
    inject(
        model,
        [AdapterRule(targets=["q_proj", "mlp.up_proj"], adapter=LoraConfig(rank=3, alpha=6, init="pissa"))],
    )
    with torch.no_grad():
        assert torch.allclose(logits(model, input_ids), logits(make_llama(dtype=F64), input_ids), atol=1e-5)
    # one fake training step moves A and B away from the principal factors
    model.train()
    model(input_ids, labels=input_ids).loss.backward()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter -= 5.0 * parameter.grad
    model.eval()
    expected = logits(model, input_ids)
    assert not torch.allclose(expected, logits(make_llama(dtype=F64), input_ids), atol=1e-4)

    folder = export_peft(model, tmp_path / "pissa")
    tensors = load_file(folder / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (6, 32)
    peft_model = peft.PeftModel.from_pretrained(make_llama(dtype=F64), str(folder)).eval()
    assert_same_maths(logits(peft_model, input_ids), expected)


def test_round_trip_ours_peft_ours_is_exact(make_llama, input_ids, tmp_path):
    model = our_lora_model(make_llama, MIXED_RULES)
    expected = logits(model, input_ids)
    folder = export_peft(model, tmp_path / "export")
    back = make_llama()
    report = import_peft(back, folder)
    assert report.adapted == {name: "lora" for name, _ in adapted_layers(model)}
    original = adapter_state_dict(model)
    assert adapter_state_dict(back).keys() == original.keys()
    for key, value in adapter_state_dict(back).items():
        assert torch.equal(value, original[key]), key
    for name, layer in adapted_layers(back):
        assert layer.adapter.scaling == dict(adapted_layers(model))[name].adapter.scaling
    assert torch.equal(logits(back, input_ids), expected)


def test_export_refuses_moe_adapters_and_existing_folders(make_llama, tmp_path):
    model = make_llama()
    inject(model, [AdapterRule(targets=["mlp.up_proj"], adapter=MoEConfig(rank=2, num_experts=2))])
    with pytest.raises(AdapterConfigError, match=r"plain LoRA only.*model\.layers\.0\.mlp\.up_proj.*'moe'"):
        export_peft(model, tmp_path / "moe")
    lora = our_lora_model(make_llama, MIXED_RULES)
    folder = export_peft(lora, tmp_path / "lora")
    before = (folder / "adapter_model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_peft(our_lora_model(make_llama, MIXED_RULES, seed=1), folder)
    assert (folder / "adapter_model.safetensors").read_bytes() == before


def test_import_refuses_what_it_cannot_represent(make_llama, tmp_path):
    ours = our_lora_model(make_llama, MIXED_RULES)
    native = save_adapter(ours, MIXED_RULES, tmp_path / "native")
    with pytest.raises(AdapterCheckpointError, match="peft_type None"):
        import_peft(make_llama(), native)

    broken = tmp_path / "broken"
    broken.mkdir()
    for content, message in [
        (b"{oops", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[]", "holds a JSON list, expected an object"),
    ]:
        (broken / "adapter_config.json").write_bytes(content)
        with pytest.raises(AdapterCheckpointError, match=message):
            import_peft(make_llama(), broken)

    folder = tmp_path / "dora"
    peft_lora_folder(make_llama, folder, r=2, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(AdapterCheckpointError, match="use_dora=True"):
        import_peft(make_llama(), folder)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(AdapterCheckpointError, match="adapter_model.bin"):
        import_peft(make_llama(), pickled)


def test_import_into_a_model_of_other_shape_names_the_layer(make_llama, tmp_path):
    folder = tmp_path / "peft"
    peft_lora_folder(make_llama, folder, r=2, target_modules=["q_proj"])
    wider = make_llama(hidden_size=48)
    with pytest.raises(AdapterCheckpointError, match=r"model\.layers\.0\.self_attn\.q_proj.*\[2, 32\]"):
        import_peft(wider, folder)
    assert not any(True for _ in adapted_layers(wider))

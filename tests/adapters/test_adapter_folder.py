"""Adapter checkpoints: adapter_config.json + adapter_model.safetensors, adapter weights only."""

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lightning_moe.adapters import (
    AdaptedLinear,
    AdapterCheckpointError,
    AdapterConfigError,
    AdapterRule,
    LoraConfig,
    MoEConfig,
    adapted_layers,
    inject,
    load_adapter,
    load_adapter_weights,
    merge_adapters,
    save_adapter,
)
from lightning_moe.adapters.adapter_folder import adapter_state_dict

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"

RULES = {
    "lora": [AdapterRule(targets=["q_proj", "v_proj"], adapter=LoraConfig(rank=4, alpha=8, dropout=0.1))],
    "moe": [
        AdapterRule(targets=["mlp.up_proj"], adapter=MoEConfig(rank=4, num_experts=3, top_k=2)),
        AdapterRule(targets=["o_proj"], adapter=LoraConfig(rank=2, use_rslora=True)),
    ],
    "pissa": [
        AdapterRule(targets=["mlp.down_proj", "k_proj"], adapter=LoraConfig(rank=3, alpha=6, init="pissa"))
    ],
}


def trained_model(make_llama, randomize, kind: str, seed: int = 0):
    """A tiny Llama with the rules of `kind` injected and (fake-)trained adapter weights."""
    model = make_llama()
    inject(model, RULES[kind])
    if kind == "pissa":  # keep the PiSSA buffers, move A and B away from them
        with torch.no_grad():
            torch.manual_seed(seed)
            for _, layer in adapted_layers(model):
                layer.adapter.lora_A.add_(0.05 * torch.randn_like(layer.adapter.lora_A))
                layer.adapter.lora_B.add_(0.05 * torch.randn_like(layer.adapter.lora_B))
    else:
        randomize(model, seed=seed)
    return model


def has_adapters(model) -> bool:
    return any(isinstance(m, AdaptedLinear) for m in model.modules())


@pytest.mark.parametrize("kind", ["lora", "moe", "pissa"])
def test_round_trip_into_a_fresh_base_is_exact(make_llama, randomize, input_ids, tmp_path, kind):
    model = trained_model(make_llama, randomize, kind)
    with torch.no_grad():
        expected = model(input_ids).logits
        base_out = make_llama()(input_ids).logits
    assert not torch.allclose(expected, base_out, atol=1e-4)  # the adapter really changes the model
    folder = save_adapter(model, RULES[kind], tmp_path / "adapter", base_model="tiny-llama")
    assert folder == tmp_path / "adapter"

    fresh = make_llama()
    report = load_adapter(fresh, folder)
    assert report.adapted == {name: layer.config.kind for name, layer in adapted_layers(model)}
    with torch.no_grad():
        assert torch.equal(fresh(input_ids).logits, expected)
    for key, value in adapter_state_dict(model).items():
        assert torch.equal(adapter_state_dict(fresh)[key], value), key
    # the loaded model trains its adapters only, like a freshly injected one
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }
    # the configs were rebuilt from the json
    for name, layer in adapted_layers(fresh):
        assert layer.config == dict(adapted_layers(model))[name].config


def test_folder_holds_exactly_two_files_with_adapter_weights_only(make_llama, randomize, tmp_path):
    model = trained_model(make_llama, randomize, "moe")
    folder = save_adapter(model, RULES["moe"], tmp_path / "adapter")
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG, WEIGHTS]
    with safe_open(str(folder / WEIGHTS), framework="pt") as handle:
        keys = set(handle.keys())
    assert keys == set(adapter_state_dict(model))
    adapter_names = (".router.gate.weight", ".experts.lora_A", ".experts.lora_B", ".lora_A", ".lora_B")
    assert all(key.endswith(adapter_names) for key in keys), keys
    assert not any("base_layer" in key or "embed_tokens" in key or "norm" in key for key in keys)
    stored = load_file(folder / WEIGHTS)
    adapter_numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(t.numel() for t in stored.values()) == adapter_numel
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    assert (folder / WEIGHTS).stat().st_size < adapter_numel * 4 + 4096 < base_bytes / 3

    config = json.loads((folder / CONFIG).read_text())
    assert config["modules"] == {
        **{f"model.layers.{i}.mlp.up_proj": "moe" for i in range(2)},
        **{f"model.layers.{i}.self_attn.o_proj": "lora" for i in range(2)},
    }
    assert [AdapterRule.from_dict(rule) for rule in config["rules"]] == RULES["moe"]


def test_pissa_checkpoint_holds_its_offset_buffers(make_llama, randomize, tmp_path):
    model = trained_model(make_llama, randomize, "pissa")
    folder = save_adapter(model, RULES["pissa"], tmp_path / "adapter")
    keys = set(load_file(folder / WEIGHTS))
    assert (
        "model.layers.0.mlp.down_proj.pissa_A0" in keys and "model.layers.1.self_attn.k_proj.pissa_B0" in keys
    )


def test_refuses_to_overwrite_unless_asked(make_llama, randomize, tmp_path):
    model = trained_model(make_llama, randomize, "lora")
    folder = save_adapter(model, RULES["lora"], tmp_path / "adapter")
    before = {name: (folder / name).read_bytes() for name in (CONFIG, WEIGHTS)}
    randomize(model, seed=1)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_adapter(model, RULES["lora"], folder)
    assert {name: (folder / name).read_bytes() for name in (CONFIG, WEIGHTS)} == before
    save_adapter(model, RULES["lora"], folder, overwrite=True)
    assert (folder / WEIGHTS).read_bytes() != before[WEIGHTS]
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG, WEIGHTS]  # no staging leftovers
    stored = load_file(folder / WEIGHTS)
    assert all(torch.equal(stored[k], v) for k, v in adapter_state_dict(model).items())


def test_saving_a_merged_model_or_one_without_adapters_is_refused(make_llama, randomize, tmp_path):
    model = trained_model(make_llama, randomize, "lora")
    merge_adapters(model)
    with pytest.raises(AdapterConfigError, match="merged"):
        save_adapter(model, RULES["lora"], tmp_path / "merged")
    with pytest.raises(AdapterConfigError, match="no adapters"):
        save_adapter(make_llama(), RULES["lora"], tmp_path / "empty")
    assert not (tmp_path / "merged" / WEIGHTS).exists()


@pytest.fixture
def saved_lora(make_llama, randomize, tmp_path):
    model = trained_model(make_llama, randomize, "lora")
    return save_adapter(model, RULES["lora"], tmp_path / "adapter")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_weights_file(make_llama, saved_lora, damage):
    path = saved_lora / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(
        {"truncate": data[: len(data) // 2], "garbage": b"\x93\x07not-a-safetensors-file" * 50, "empty": b""}[
            damage
        ]
    )
    fresh = make_llama()
    with pytest.raises(AdapterCheckpointError, match="adapter_model.safetensors"):
        load_adapter(fresh, saved_lora)
    assert not has_adapters(fresh)  # refused before the model was touched


def test_missing_weights_file_and_missing_folder(make_llama, saved_lora, tmp_path):
    (saved_lora / WEIGHTS).unlink()
    with pytest.raises(AdapterCheckpointError, match="does not exist"):
        load_adapter(make_llama(), saved_lora)
    with pytest.raises(AdapterCheckpointError, match="does not exist"):
        load_adapter(make_llama(), tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),  # not even UTF-8
        (b"[1, 2]", "holds a JSON list, expected an object"),
        (b'{"peft_type": "LORA", "r": 8}', "import_peft"),
    ],
)
def test_invalid_config_file(make_llama, saved_lora, text, message):
    (saved_lora / CONFIG).write_bytes(text)
    fresh = make_llama()
    with pytest.raises(AdapterCheckpointError, match=message):
        load_adapter(fresh, saved_lora)
    assert not has_adapters(fresh)


def test_wrong_version_and_broken_rules(make_llama, saved_lora):
    config = json.loads((saved_lora / CONFIG).read_text())
    (saved_lora / CONFIG).write_text(json.dumps({**config, "version": 99}))
    with pytest.raises(AdapterCheckpointError, match="version 99"):
        load_adapter(make_llama(), saved_lora)
    broken = json.loads(json.dumps(config))
    broken["rules"][0]["adapter"]["rank"] = 0
    (saved_lora / CONFIG).write_text(json.dumps(broken))
    with pytest.raises(AdapterCheckpointError, match="rank=0"):
        load_adapter(make_llama(), saved_lora)


def test_adapter_from_a_different_base_is_refused(make_llama, saved_lora):
    other = make_llama(seed=1)  # same architecture, other random weights
    with pytest.raises(AdapterCheckpointError, match=r"different base.*model\.layers\.0\.self_attn\.q_proj"):
        load_adapter(other, saved_lora)
    assert not has_adapters(other)


def test_adapter_for_other_shapes_names_the_layer(make_llama, saved_lora):
    wider = make_llama(hidden_size=48)
    with pytest.raises(
        AdapterCheckpointError, match=r"'model\.layers\.0\.self_attn\.q_proj' has shape \[32, 32\]"
    ):
        load_adapter(wider, saved_lora)
    assert not has_adapters(wider)


def test_adapter_for_a_missing_layer_is_refused(make_llama, saved_lora):
    config = json.loads((saved_lora / CONFIG).read_text())
    config["fingerprint"]["model.layers.7.self_attn.q_proj"] = {"shape": [32, 32], "head": [0.0]}
    (saved_lora / CONFIG).write_text(json.dumps(config))
    with pytest.raises(AdapterCheckpointError, match=r"model\.layers\.7\.self_attn\.q_proj"):
        load_adapter(make_llama(), saved_lora)


def test_tensor_of_wrong_shape_names_the_key(make_llama, saved_lora):
    tensors = load_file(saved_lora / WEIGHTS)
    key = "model.layers.1.self_attn.v_proj.lora_B"
    assert tensors[key].shape == (16, 4)  # v_proj of the GQA tiny Llama: 2 kv heads x 8
    tensors[key] = torch.zeros(16, 5)
    save_file(tensors, saved_lora / WEIGHTS)
    model = make_llama()
    with pytest.raises(
        AdapterCheckpointError,
        match=rf"'{re.escape(key)}' has shape \[16, 5\], the adapter expects \[16, 4\]",
    ):
        load_adapter(model, saved_lora)
    # the failed load left the model as it was: no adapter attached, nothing frozen
    assert not list(adapted_layers(model))
    assert all(p.requires_grad for p in model.parameters())


def test_missing_and_extra_tensors_name_the_key(make_llama, saved_lora):
    tensors = load_file(saved_lora / WEIGHTS)
    tensors["model.layers.0.self_attn.q_proj.extra"] = torch.zeros(1)
    save_file(tensors, saved_lora / WEIGHTS)
    with pytest.raises(AdapterCheckpointError, match=r"model\.layers\.0\.self_attn\.q_proj\.extra"):
        load_adapter(make_llama(), saved_lora)
    del tensors["model.layers.0.self_attn.q_proj.extra"]
    del tensors["model.layers.1.self_attn.q_proj.lora_A"]
    save_file(tensors, saved_lora / WEIGHTS)
    with pytest.raises(
        AdapterCheckpointError, match=r"lacks adapter tensor 'model\.layers\.1\.self_attn\.q_proj\.lora_A'"
    ):
        load_adapter(make_llama(), saved_lora)


def test_load_adapter_weights_into_an_injected_model(make_llama, randomize, input_ids, tmp_path):
    model = trained_model(make_llama, randomize, "moe")
    folder = save_adapter(model, RULES["moe"], tmp_path / "adapter")
    target = make_llama()
    inject(target, RULES["moe"])
    load_adapter_weights(target, folder)
    with torch.no_grad():
        assert torch.equal(target(input_ids).logits, model(input_ids).logits)


def test_load_adapter_weights_with_the_wrong_kind(make_llama, randomize, tmp_path):
    model = trained_model(make_llama, randomize, "moe")
    folder = save_adapter(model, RULES["moe"], tmp_path / "adapter")
    target = make_llama()
    inject(target, [AdapterRule(targets=["mlp.up_proj", "o_proj"], adapter=LoraConfig(rank=4))])
    before = {k: v.clone() for k, v in adapter_state_dict(target).items()}
    with pytest.raises(
        AdapterCheckpointError, match=r"'moe' adapter for 'model\.layers\.0\.mlp\.up_proj'.*'lora'"
    ):
        load_adapter_weights(target, folder)
    assert all(torch.equal(v, before[k]) for k, v in adapter_state_dict(target).items())

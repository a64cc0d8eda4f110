"""Mixtures of pre-trained LoRAs (X-LoRA, MeteoRA): experts from PEFT or our folders, packed and
frozen, checked against the single adapters they came from."""

import pytest
import torch

from lightning_moe.adapters import (
    AdapterCheckpointError,
    AdapterConfigError,
    AdapterRule,
    LoraConfig,
    LoraMixtureAdapter,
    MeteoraConfig,
    MoEConfig,
    XLoraConfig,
    adapted_layers,
    gate_label_loss,
    inject,
    load_adapter,
    merge_adapters,
    routing_collector,
    save_adapter,
    unmerge_adapters,
)
from lightning_moe.adapters.adapter_folder import adapter_state_dict
from lightning_moe.adapters.routing import RoutingRecord
from tests.tolerances import assert_same_maths

from .test_peft_interop import logits, peft_lora_folder

# A one-hot mixture is the single LoRA and the backends are the same maths, through different
# kernels: the models, the experts and their peft originals are float64 (see assert_same_maths).
F64 = torch.float64
# The grouped backend runs in fp32 only (torch's grouped GEMM), so there the whole tiny Llama
# rounds in fp32 and is compared with the float64 result. A sum of n terms errs by at most
# n * u * sum|terms| (u = 2^-24); the longest sums here have 64 terms (MLP width, vocabulary) and a
# value passes about 16 of them to the logits (and as many back to the gate gradients):
# 16 * 64 * u = 6.1e-5 as rtol and as the fraction of each tensor's largest |value| for atol.
GROUPED_FP32_TOL = 16 * 64 * 2.0**-24


def assert_fp32_close(actual: torch.Tensor, expected: torch.Tensor, msg=None) -> None:
    assert actual.dtype == torch.float32 and expected.dtype == F64
    atol = GROUPED_FP32_TOL * expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected, rtol=GROUPED_FP32_TOL, atol=atol, msg=msg)


# Different ranks and different target sets: the packing pads ranks and leaves zeros where an
# expert does not adapt a layer.
PEFT_EXPERTS = [
    {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]},
    {
        "r": 4,
        "lora_alpha": 4,
        "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"],
        "use_rslora": True,
    },
    {
        "r": 3,
        "lora_alpha": 9,
        "target_modules": ["k_proj", "up_proj", "down_proj"],
        "rank_pattern": {"k_proj": 5},
    },
]
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


@pytest.fixture
def peft_experts(make_llama, tmp_path):
    """Three PEFT LoRA folders made by peft itself, and the peft models they came from."""
    folders, models = [], []
    for index, config in enumerate(PEFT_EXPERTS):
        folder = tmp_path / f"peft_expert_{index}"
        models.append(peft_lora_folder(make_llama, folder, seed=index, dtype=F64, **config))
        folders.append(str(folder))
    return folders, models


def mixture(make_llama, adapter, targets=TARGETS, seed: int = 0):
    model = make_llama(seed, dtype=F64)
    inject(model, [AdapterRule(targets=list(targets), adapter=adapter)])
    return model


@pytest.mark.parametrize("expert", range(len(PEFT_EXPERTS)))
def test_one_hot_fixed_weights_equal_the_single_peft_adapter(make_llama, input_ids, peft_experts, expert):
    folders, peft_models = peft_experts
    one_hot = [float(k == expert) for k in range(len(folders))]
    model = mixture(make_llama, XLoraConfig(experts=folders, fixed_weights=one_hot))
    assert_same_maths(logits(model, input_ids), logits(peft_models[expert], input_ids))


@pytest.mark.parametrize("backend", ["loop", "dense", "grouped"])
def test_one_hot_gate_picks_one_peft_adapter(make_llama, input_ids, peft_experts, backend):
    folders, peft_models = peft_experts
    model = mixture(make_llama, MeteoraConfig(experts=folders, top_k=1, backend=backend))
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            layer.adapter.gate.net.weight.zero_()
            layer.adapter.gate.net.bias.copy_(torch.tensor([0.0, 5.0, 0.0]))
    expected = logits(peft_models[1], input_ids)
    if backend == "grouped":
        assert_fp32_close(logits(model.float(), input_ids), expected)
    else:
        assert_same_maths(logits(model, input_ids), expected)


def test_our_experts_with_rslora_and_pissa_mix_exactly(make_llama, input_ids, randomize, tmp_path):
    singles, folders = [], []
    for index, lora in enumerate([LoraConfig(rank=3, use_rslora=True), LoraConfig(rank=2, init="pissa")]):
        single = make_llama(dtype=F64)
        rules = [AdapterRule(targets=["q_proj", "down_proj"], adapter=lora)]
        inject(single, rules)
        randomize(single, seed=index)
        folders.append(str(save_adapter(single, rules, tmp_path / f"ours_{index}")))
        singles.append(single)
    for expert, single in enumerate(singles):
        one_hot = [float(k == expert) for k in range(2)]
        model = mixture(
            make_llama, XLoraConfig(experts=folders, fixed_weights=one_hot), ["q_proj", "down_proj"]
        )
        assert_same_maths(logits(model, input_ids), logits(single, input_ids))


def test_fresh_xlora_starts_as_the_merged_average_which_merges(make_llama, input_ids, peft_experts):
    folders, _ = peft_experts
    uniform = [1 / 3] * 3
    xlora = mixture(make_llama, XLoraConfig(experts=folders))
    average = mixture(make_llama, XLoraConfig(experts=folders, fixed_weights=uniform))
    expected = logits(average, input_ids)
    assert_same_maths(logits(xlora, input_ids), expected)
    with pytest.raises(Exception, match="cannot merge layer .* 'xlora' adapter"):
        merge_adapters(xlora)
    merge_adapters(average)
    assert_same_maths(logits(average, input_ids), expected)
    unmerge_adapters(average)
    assert_same_maths(logits(average, input_ids), expected)


def gate_step(model, input_ids):
    """Outputs and gate gradients of one forward/backward pass."""
    model.zero_grad()
    out = model(input_ids).logits
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads


@pytest.mark.parametrize("kind", [XLoraConfig, MeteoraConfig])
def test_backends_agree_in_outputs_and_gate_gradients(make_llama, input_ids, peft_experts, kind, randomize):
    folders, _ = peft_experts
    results = {}
    for backend in ["loop", "dense", "grouped"]:
        model = mixture(make_llama, kind(experts=folders, backend=backend, gate_hidden=8))
        randomize(model, seed=3, scale=0.5)  # in float64, so every backend gets the same gates
        results[backend] = gate_step(model.float() if backend == "grouped" else model, input_ids)
    reference_out, reference_grads = results["loop"]
    assert reference_grads and all(".gate." in name for name in reference_grads)
    assert any(g.abs().sum() > 0 for g in reference_grads.values())
    for backend, same in [("dense", assert_same_maths), ("grouped", assert_fp32_close)]:
        out, grads = results[backend]
        same(out, reference_out)
        for name, grad in reference_grads.items():
            same(grads[name], grad, msg=name)


def test_experts_are_frozen_buffers_outside_the_state_dict(make_llama, peft_experts):
    folders, _ = peft_experts
    model = mixture(make_llama, XLoraConfig(experts=folders))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".adapter.gate." in name for name in trainable)
    assert all(".gate." in key for key in adapter_state_dict(model))
    layer = model.get_submodule("model.layers.0.self_attn.k_proj").adapter
    assert isinstance(layer, LoraMixtureAdapter)
    # only expert 2 adapts k_proj (rank 5 there): the others are zero, padded to rank 5
    assert layer.expert_A.shape == (3, 5, 32)
    assert layer.expert_A[:2].abs().sum() == 0 and layer.expert_B[:2].abs().sum() == 0


def test_xlora_runs_the_base_model_once_per_step(make_llama, input_ids, peft_experts):
    folders, _ = peft_experts
    model = mixture(make_llama, XLoraConfig(experts=folders, gate_hidden=4)).train()
    calls = {"decoder": 0, "q_proj": 0}
    model.model.register_forward_hook(lambda *_: calls.__setitem__("decoder", calls["decoder"] + 1))
    q_proj = model.get_submodule("model.layers.0.self_attn.q_proj").base_layer
    q_proj.register_forward_hook(lambda *_: calls.__setitem__("q_proj", calls["q_proj"] + 1))
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    assert calls == {"decoder": 1, "q_proj": 1}
    gate = model.get_submodule("model.layers.0.self_attn.q_proj").adapter.gate
    assert gate.net[-1].weight.grad.abs().sum() > 0  # the output layer starts at zero, so it learns first


def test_gates_report_their_choices(make_llama, input_ids, peft_experts):
    folders, _ = peft_experts
    model = mixture(make_llama, MeteoraConfig(experts=folders, top_k=2))
    with routing_collector(model).capture() as records:
        model(input_ids)
    assert len(records) == 2 * len(TARGETS)
    record = records["model.layers.1.mlp.up_proj"]
    assert record.logits.shape == (2, 7, 3) and record.indices.shape == (2, 7, 2)


def test_saved_mixture_holds_gates_and_expert_references(
    make_llama, input_ids, peft_experts, randomize, tmp_path
):
    folders, _ = peft_experts
    config = MeteoraConfig(experts=folders, top_k=2)
    rules = [AdapterRule(targets=TARGETS, adapter=config)]
    model = make_llama()
    inject(model, rules)
    randomize(model, seed=5)
    assert config.expert_sha256 is not None and len(config.expert_sha256) == 3
    saved = save_adapter(model, rules, tmp_path / "meteora")
    reloaded = make_llama()
    load_adapter(reloaded, saved)
    torch.testing.assert_close(logits(reloaded, input_ids), logits(model, input_ids))

    # an expert rewritten after the gate was trained is refused, by name
    peft_lora_folder(make_llama, tmp_path / "peft_expert_1", seed=99, **PEFT_EXPERTS[1])
    with pytest.raises(
        AdapterCheckpointError, match=r"expert adapter .*peft_expert_1 changed since this mixture"
    ):
        load_adapter(make_llama(), saved)


def test_missing_expert_folder_is_one_clear_error(make_llama, peft_experts, tmp_path):
    folders, _ = peft_experts
    with pytest.raises(AdapterCheckpointError, match=r"LoRA adapter folder .*nowhere does not exist"):
        mixture(make_llama, XLoraConfig(experts=[folders[0], str(tmp_path / "nowhere")]))


def test_expert_for_another_base_is_refused(make_llama, randomize, tmp_path, peft_experts):
    other = make_llama(seed=1)  # same shapes, other weights: our fingerprint tells them apart
    rules = [AdapterRule(targets=["q_proj"], adapter=LoraConfig(rank=2))]
    inject(other, rules)
    folder = save_adapter(other, rules, tmp_path / "other_base")
    with pytest.raises(AdapterCheckpointError, match=r"other_base was saved from a different base model"):
        mixture(make_llama, XLoraConfig(experts=[str(folder)]), ["q_proj"])
    wider = peft_lora_folder(
        lambda: make_llama(hidden_size=48), tmp_path / "wider", r=2, target_modules=["q_proj"]
    )
    del wider
    with pytest.raises(
        AdapterCheckpointError, match=r"wider: LoRA factors of .*q_proj' have shapes \[2, 48\]"
    ):
        mixture(
            make_llama,
            XLoraConfig(experts=[peft_experts[0][0], str(tmp_path / "wider")]),
            ["q_proj", "v_proj"],
        )


def test_targets_must_match_what_the_experts_adapt(make_llama, peft_experts, tmp_path, randomize):
    folders, _ = peft_experts
    with pytest.raises(
        AdapterCheckpointError, match=r"adapts 'model.layers.0.self_attn.v_proj', which is not among"
    ):
        mixture(make_llama, XLoraConfig(experts=folders[:1]), ["q_proj"])
    with pytest.raises(
        AdapterCheckpointError, match=r"no expert adapts layer 'model.layers.0.self_attn.o_proj'"
    ):
        mixture(make_llama, XLoraConfig(experts=folders[:1]), ["q_proj", "v_proj", "o_proj"])
    moe = make_llama()
    rules = [AdapterRule(targets=["up_proj"], adapter=MoEConfig(num_experts=2))]
    inject(moe, rules)
    folder = save_adapter(moe, rules, tmp_path / "moe")
    with pytest.raises(AdapterCheckpointError, match=r"holds a 'moe' adapter .* only plain-LoRA adapters"):
        mixture(make_llama, XLoraConfig(experts=[str(folder)]), ["up_proj"])


def test_gate_label_loss_is_token_cross_entropy_against_the_sequence_label():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [3.0, 0.0]]])  # [B=2, T=2, K=2]
    record = RoutingRecord("layer", logits, logits.argmax(-1, keepdim=True))
    mask = torch.tensor([[1, 1], [1, 0]])
    labels = torch.tensor([0, 1])
    log_probs = logits.log_softmax(-1)
    expected = -(log_probs[0, 0, 0] + log_probs[0, 1, 0] + log_probs[1, 0, 1]) / 3
    torch.testing.assert_close(gate_label_loss({"layer": record}, labels, mask), expected)
    unlabelled = gate_label_loss({"layer": record}, torch.tensor([-100, -100]), mask)
    assert unlabelled == 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"experts": []}, r"needs expert adapter folders, got experts=\[\]"),
        ({"experts": ["a", "a"]}, r"experts must be distinct folders"),
        (
            {"experts": ["a", "b"], "fixed_weights": [1.0]},
            r"fixed_weights needs one entry per expert \(2\), got 1",
        ),
        ({"experts": ["a", "b"], "top_k": 3}, r"top_k must be between 1 and the 2 experts, got top_k=3"),
        ({"experts": ["a"], "temperature": 0.0}, r"temperature must be > 0"),
    ],
)
def test_bad_mixture_options_are_refused(options, message):
    with pytest.raises(AdapterConfigError, match=message):
        XLoraConfig(**options)


def test_two_mixtures_may_share_experts(make_llama, input_ids, peft_experts):
    folders, peft_models = peft_experts
    model = make_llama(dtype=F64)
    one_hot = [0.0, 1.0, 0.0]
    rules = [
        AdapterRule(
            targets=["q_proj", "k_proj", "v_proj"],
            adapter=XLoraConfig(experts=folders, fixed_weights=one_hot),
        ),
        AdapterRule(
            targets=["up_proj", "down_proj"], adapter=MeteoraConfig(experts=folders, fixed_weights=one_hot)
        ),
    ]
    inject(model, rules)
    assert_same_maths(logits(model, input_ids), logits(peft_models[1], input_ids))


def test_temperature_divides_the_gate_logits(make_llama, input_ids, peft_experts, randomize):
    folders, _ = peft_experts
    recorded = {}
    for temperature in (1.0, 0.5):
        model = mixture(make_llama, XLoraConfig(experts=folders, temperature=temperature))
        randomize(model, seed=4)
        with routing_collector(model).capture() as records:
            model(input_ids)
        recorded[temperature] = records["model.layers.0.self_attn.q_proj"].logits  # input before any adapter
    torch.testing.assert_close(recorded[0.5], 2 * recorded[1.0])

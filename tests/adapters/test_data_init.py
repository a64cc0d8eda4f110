"""Data-driven inits (EVA, LoRA-GA) against peft's and against their formulas, on a tiny Llama."""

import copy
import functools

import pytest
import torch

from lightning_moe.adapters import (
    AdapterConfigError,
    AdapterRule,
    adapted_layers,
    config_from_dict,
    data_init,
    inject,
)
from lightning_moe.adapters.adapter_folder import load_adapter, save_adapter
from lightning_moe.adapters.data_init import initialise_from_data, resolved_rules
from lightning_moe.adapters.incremental_svd import IncrementalSVD
from lightning_moe.adapters.peft_interop import export_peft
from tests.tiny import VOCAB_SIZE

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def token_batches(count, shape=(8, 24), seed=1, labels=False):
    generator = torch.Generator().manual_seed(seed)
    batches = [{"input_ids": torch.randint(0, VOCAB_SIZE, shape, generator=generator)} for _ in range(count)]
    for batch in batches:
        if labels:
            batch["labels"] = batch["input_ids"]
    return batches


def loss_of(model):
    return lambda batch: (model(**batch).loss if "labels" in batch else model(**batch).logits.sum(), None)


def subspace_cosines(rows_a, rows_b):
    """Cosines of the principal angles between the row spaces of two [k, d] matrices."""
    qa, _ = torch.linalg.qr(rows_a.double().T)
    qb, _ = torch.linalg.qr(rows_b.double().T)
    return torch.linalg.svdvals(qa.T @ qb)


def test_incremental_svd_equals_the_pca_of_all_rows():
    """Exact when nothing is truncated: rows of rank 5 (plus a mean the updates must follow)."""
    generator = torch.Generator().manual_seed(0)
    mix = torch.randn(5, 12, generator=generator, dtype=torch.float64)
    rows = torch.randn(300, 5, generator=generator, dtype=torch.float64) @ mix + 3.0
    centred = rows - rows.mean(0)
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    ratio = singular[:5].square() / centred.square().sum()
    for exact, tolerance in ((True, 1e-10), (False, 1e-5)):  # the randomised default, in float32
        svd = IncrementalSVD(5, exact=exact)
        for chunk in rows.split(40):
            svd.partial_fit(chunk)
        cosines = subspace_cosines(svd.components, vh[:5])
        assert torch.allclose(cosines, torch.ones(5, dtype=torch.float64), atol=tolerance)
        assert torch.allclose(svd.singular_values, singular[:5], rtol=tolerance)
        assert torch.allclose(svd.explained_variance_ratio, ratio, rtol=tolerance)


def test_eva_gives_peft_ranks_and_subspaces(make_llama, monkeypatch):
    """Same batches, same tau: peft's rank pattern and directions. Both sides' randomised SVDs
    (svd_lowrank, differently seeded) are swapped for their exact options, so the algorithms are
    compared, not two random draws."""
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model
    from peft.tuners.lora import EvaConfig, eva

    class ExactPCA(eva.IncrementalPCA):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **(kwargs | {"lowrank": False}))

    monkeypatch.setattr(eva, "IncrementalPCA", ExactPCA)
    monkeypatch.setattr(data_init, "IncrementalSVD", functools.partial(IncrementalSVD, exact=True))
    batches = token_batches(24)
    base = make_llama()
    ours = copy.deepcopy(base)
    eva_options = {"kind": "lora", "rank": 4, "alpha": 8, "init": "eva", "init_batches": 24, "eva_tau": 0.9}
    inject(ours, [AdapterRule(targets=TARGETS, adapter=eva_options)])
    report = initialise_from_data(ours, batches, loss_of(ours))
    assert all(report.eva_converged.values()) and report.batches["eva"] < 24
    assert sum(report.eva_ranks.values()) == 4 * 14 and len(set(report.eva_ranks.values())) > 1

    theirs = get_peft_model(
        copy.deepcopy(base),
        PeftConfig(
            r=4,
            lora_alpha=8,
            target_modules=TARGETS,
            init_lora_weights="eva",
            eva_config=EvaConfig(rho=2.0, tau=0.9),
        ),
    )
    eva.initialize_lora_eva_weights(theirs, batches, show_progress_bar=False)
    pattern = {name: rank for name, rank in report.eva_ranks.items() if rank != 4}
    assert pattern == theirs.peft_config["default"].rank_pattern
    layers = dict(adapted_layers(ours))
    for name in report.eva_ranks:
        peft_A = theirs.get_submodule(f"base_model.model.{name}").lora_A["default"].weight.detach()
        ours_A = layers[name].adapter.lora_A.detach()
        assert subspace_cosines(ours_A, peft_A).min() > 1 - 1e-6
        assert torch.allclose(ours_A, peft_A, atol=1e-4)  # same signs too
        assert layers[name].adapter.scaling == 2.0  # alpha followed the rank
        assert not layers[name].adapter.lora_B.any()


def test_eva_ranks_travel_with_the_folder_and_the_peft_export(make_llama, tmp_path):
    model = make_llama()
    rules = [
        AdapterRule(
            targets=TARGETS,
            adapter={"kind": "lora", "rank": 4, "init": "eva", "init_batches": 6, "eva_tau": 0.5},
        )
    ]
    inject(model, rules)
    report = initialise_from_data(model, token_batches(6), loss_of(model))
    rules = resolved_rules(rules, model, report)
    save_adapter(model, rules, tmp_path / "eva")
    fresh = make_llama()
    load_adapter(fresh, tmp_path / "eva")
    for name, layer in adapted_layers(fresh):
        assert layer.adapter.lora_A.shape[0] == report.eva_ranks[name]
        assert torch.equal(layer.adapter.lora_A, model.get_submodule(name).adapter.lora_A)
    export_peft(model, tmp_path / "peft")
    import json

    exported = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    expected = {name: rank for name, rank in report.eva_ranks.items() if rank != exported["r"]}
    assert exported["rank_pattern"] == expected and expected


@pytest.mark.parametrize(
    ("options", "projection"),
    [
        ({"kind": "moe", "rank": 2, "num_experts": 4}, lambda adapter: adapter.experts.lora_A),
        ({"kind": "mora", "rank": 8, "top_k": 2}, lambda adapter: adapter.lora_A),
    ],
    ids=["moe experts", "mora atoms"],
)
def test_eva_gives_experts_distinct_slices_of_the_top_directions(make_llama, options, projection):
    model = make_llama()
    options = options | {"init": "eva", "init_batches": 4, "eva_tau": 0.5}
    inject(model, [AdapterRule(targets=["mlp.up_proj"], adapter=options)])
    batches = token_batches(4)
    with torch.no_grad():
        before = model(**batches[0]).logits
    initialise_from_data(model, batches, loss_of(model))
    for _, layer in adapted_layers(model):
        stacked = projection(layer.adapter).detach().reshape(8, -1)
        gram = stacked @ stacked.T  # 8 orthonormal directions: experts (atoms) share none
        assert torch.allclose(gram, torch.eye(8), atol=1e-5)
    with torch.no_grad():
        assert torch.equal(model(**batches[0]).logits, before)  # B = 0: the start is the base model


@pytest.mark.parametrize("scale", ["peft", "stable"])
def test_lora_ga_matches_peft_and_starts_at_the_base_model(make_llama, scale):
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model
    from peft.tuners.lora import LoraGAConfig, preprocess_loraga

    targets = ["q_proj", "o_proj", "gate_proj", "down_proj"]
    batches = token_batches(3, shape=(4, 12), labels=True)
    base = make_llama(dtype=torch.float64)
    ours = copy.deepcopy(base)
    options = {
        "kind": "lora",
        "rank": 4,
        "alpha": 8,
        "init": "lora_ga",
        "init_batches": 3,
        "lora_ga_scale": scale,
    }
    inject(ours, [AdapterRule(targets=targets, adapter=options)])
    with torch.no_grad():
        expected = base(**batches[0]).logits
    initialise_from_data(ours, batches, loss_of(ours))
    with torch.no_grad():
        assert torch.equal(ours(**batches[0]).logits, expected)

    peft_base = copy.deepcopy(base)
    config = PeftConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig()
    )
    preprocess_loraga(peft_base, config, lambda: [peft_base(**batch).loss.backward() for batch in batches])
    theirs = get_peft_model(peft_base, config)
    for name, layer in adapted_layers(ours):
        peft_layer = theirs.get_submodule(f"base_model.model.{name}")
        peft_A, peft_B = (
            peft_layer.lora_A["default"].weight.detach(),
            peft_layer.lora_B["default"].weight.detach(),
        )
        ours_A, ours_B = layer.adapter.lora_A.detach(), layer.adapter.lora_B.detach()
        assert subspace_cosines(ours_A, peft_A).min() > 1 - 1e-6
        assert subspace_cosines(ours_B.T, peft_B.T).min() > 1 - 1e-4
        if scale == "peft":  # the same values up to each singular pair's sign (peft's SVD is randomised)
            assert torch.allclose(ours_A.abs(), peft_A.abs(), atol=1e-3)
            assert torch.allclose(ours_B.norm(dim=0), peft_B.norm(dim=0), rtol=1e-3)
        else:  # the paper's stable scale: unit singular vectors times d_out^(1/4) / sqrt(gamma)
            factor = layer.base_layer.out_features**0.25 / 16**0.5
            assert torch.allclose(ours_A.norm(dim=1), torch.full((4,), factor, dtype=ours_A.dtype))
            assert torch.allclose(ours_B.norm(dim=0), torch.full((4,), factor, dtype=ours_B.dtype))


def test_lora_ga_start_survives_an_adapter_only_round_trip(make_llama, tmp_path):
    model = make_llama(dtype=torch.float64)
    rules = [
        AdapterRule(
            targets=["o_proj"], adapter={"kind": "lora", "rank": 2, "init": "lora_ga", "init_batches": 2}
        )
    ]
    inject(model, rules)
    batches = token_batches(2, shape=(2, 8), labels=True)
    initialise_from_data(model, batches, loss_of(model))
    save_adapter(model, rules, tmp_path / "ga")
    fresh = make_llama(dtype=torch.float64)
    load_adapter(fresh, tmp_path / "ga")
    with torch.no_grad():
        assert torch.equal(fresh(**batches[0]).logits, make_llama(dtype=torch.float64)(**batches[0]).logits)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kind": "codyra", "init": "eva"}, "init='eva' does not apply to rank-gated LoRA adapters"),
        ({"kind": "moe", "init": "lora_ga"}, "init='lora_ga' does not apply to MoE experts"),
        ({"kind": "mora", "init": "pissa"}, "init='pissa' does not apply to rank experts"),
        ({"kind": "lora", "init": "eva", "eva_rho": 0.5}, "eva_rho must be >= 1"),
        ({"kind": "lora", "init": "eva", "init_batches": 0}, "init_batches must be >= 1"),
    ],
)
def test_inits_a_kind_cannot_use_are_refused(options, message):
    with pytest.raises(AdapterConfigError, match=message):
        config_from_dict(options)


def test_data_inits_without_data_or_beyond_the_rank_budget_are_refused(make_llama):
    model = make_llama()
    inject(model, [AdapterRule(targets=["o_proj"], adapter={"kind": "lora", "rank": 4, "init": "eva"})])
    with pytest.raises(
        AdapterConfigError, match="init 'eva' needs training batches, but the training data gave none"
    ):
        initialise_from_data(model, [], loss_of(model))
    with pytest.raises(
        AdapterConfigError, match="layer 'model.layers.0.self_attn.o_proj' never saw 8 tokens"
    ):
        initialise_from_data(model, token_batches(2, shape=(1, 3)), loss_of(model))
    model = make_llama()
    inject(model, [AdapterRule(targets=["o_proj"], adapter={"kind": "lora", "rank": 20, "init": "lora_ga"})])
    with pytest.raises(
        AdapterConfigError, match=r"2 \* rank = 40 .* the rank budget cannot be met, use rank <= 16"
    ):
        initialise_from_data(model, token_batches(1, labels=True), loss_of(model))

"""The 4-bit base, LQ-LoRA, L4Q and LoRAM through real CLI runs: resume, exports that load where
they should, the merged quantised model, and bad combinations as one error."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_moe.adapters import adapted_layers, load_adapter
from lightning_moe.adapters.quantized import QuantizedLinear
from lightning_moe.cli import main
from lightning_moe.quantized_export import main as export_quantized
from lightning_moe.tasks.reasoning.causal_lm import build_causal_lm
from tests.test_module import EVERY_TWO_STEPS, SMALL_RUN, SMOKE, run_dir

NF4 = "--model.init_args.quantize={scheme: nf4}"
LQ_RULES = (
    "--model.init_args.adapters=["
    "{targets: [mlp.up_proj, mlp.down_proj], adapter: {kind: lora, rank: 4, init: lq_lora, lq_weighting: activations, init_batches: 2}}, "
    "{targets: [mlp.gate_proj], adapter: {kind: moe, num_experts: 2, top_k: 1, rank: 2}}]"
)


def fit(name: str, *extra: str):
    return main(["fit", "--config", SMOKE, *SMALL_RUN, f"--trainer.logger.init_args.name={name}", *extra])


def full_base(cli):
    task = cli.model
    return build_causal_lm(None, task.model_config, task.model_seed, torch.float32)


def test_nf4_lq_lora_resumes_exactly_and_its_folder_needs_the_same_base(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = fit("straight", "--trainer.max_steps=4", EVERY_TWO_STEPS, NF4, LQ_RULES)
    assert any(isinstance(m, QuantizedLinear) for m in cli.model.model.modules())
    (checkpoint,) = (run_dir("straight") / "checkpoints").glob("*step=2.ckpt")
    fit("resumed", "--trainer.max_steps=4", EVERY_TWO_STEPS, NF4, LQ_RULES, f"--ckpt_path={checkpoint}")
    straight = load_file(run_dir("straight") / "adapter/adapter_model.safetensors")
    resumed = load_file(run_dir("resumed") / "adapter/adapter_model.safetensors")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0)
    folder = run_dir("straight") / "adapter"
    assert (folder / "quantized_base.safetensors").is_file()
    # the checkpoint holds adapters only: no 4-bit base weight, no LQ offset
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert saved and all(".adapter." in key for key in saved)
    # validating the folder rebuilds the same Q (a run config that forgets `quantize` is refused)
    args = [
        "validate",
        "--config",
        SMOKE,
        *SMALL_RUN,
        f"--model.init_args.adapter_path={folder}",
        "--trainer.logger=false",
    ]
    scores = main([*args, NF4]).trainer.callback_metrics["val/loss"]
    assert torch.isfinite(scores)
    with pytest.raises(SystemExit, match="error: .*trained on a base stored as nf4 .* is not quantised"):
        main(args)


def test_loram_exports_an_adapter_for_the_full_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prune = "--model.init_args.prune={ratio: 0.5, method: calibration, calibration_batches: 2}"
    cli = fit("loram", "--trainer.max_steps=2", EVERY_TWO_STEPS, prune)
    pruned = cli.model.model
    assert pruned.model.layers[0].mlp.up_proj.base_layer.out_features == 64  # of 128
    (checkpoint,) = (run_dir("loram") / "checkpoints").glob("*step=2.ckpt")
    trained = {
        k.removeprefix("model."): v
        for k, v in torch.load(checkpoint, weights_only=True)["state_dict"].items()
    }
    folder = run_dir("loram") / "adapter"
    full = full_base(cli)
    load_adapter(full, folder)  # the full model's fingerprint and shapes
    kept = cli.model.pruned_base.kept
    for name, layer in adapted_layers(full):
        for key, value in layer.adapter.state_dict().items():
            small = trained[f"{name}.adapter.{key}"]
            if name not in kept or value.shape == small.shape:
                assert torch.equal(value, small), key
                continue
            dim = next(d for d, (a, b) in enumerate(zip(value.shape, small.shape, strict=True)) if a != b)
            channels = kept[name]
            assert torch.equal(value.index_select(dim, channels), small), key
            rest = torch.ones(value.shape[dim], dtype=torch.bool)
            rest[channels] = False
            assert value.index_select(dim, rest.nonzero().squeeze(1)).abs().max() == 0, key
    # the recovered model computes with the trained update on the kept channels only
    ids = torch.randint(0, 259, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(full(ids).logits).all()


def test_l4q_export_is_the_model_that_trained(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rules = "--model.init_args.adapters=[{targets: [mlp.up_proj, mlp.down_proj], adapter: {kind: l4q, rank: 4, group_size: 32}}]"
    fit("l4q", "--trainer.max_steps=2", EVERY_TWO_STEPS, rules)
    folder = run_dir("l4q") / "adapter"
    report = export_quantized([str(folder), "--output", str(tmp_path / "export"), "--compare"])
    metrics = report["metrics"]
    trained, merged = metrics["L4Q as trained (unmerged)"], metrics["merged and quantised (from the export)"]
    assert merged["val/loss"] == pytest.approx(trained["val/loss"], rel=1e-5)
    assert metrics["W + s B A, unquantised"]["val/loss"] != pytest.approx(trained["val/loss"], rel=1e-5)
    codes = load_file(tmp_path / "export/quantized_layers.safetensors")
    config = json.loads(Path(tmp_path / "export/quantized_config.json").read_text())
    assert len(config) == 4 and all(v == {"bits": 4, "group_size": 32} for v in config.values())
    name = "model.layers.0.mlp.up_proj"
    assert codes[f"{name}.codes"].dtype == torch.int8 and codes[f"{name}.codes"].abs().max() <= 8
    assert codes[f"{name}.step_size"].shape == (128, 2)
    assert "| merged and quantised (from the export) |" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            (NF4, "--model.init_args.prune={ratio: 0.5}"),
            "prune trains fresh adapters .* neither adapter_path .* nor quantize",
        ),
        (
            ("--model.init_args.adapters=[{targets: [mlp.up_proj], adapter: {kind: lora, init: lq_lora}}]",),
            "init 'lq_lora' .* set the model's `quantize`",
        ),
        (
            (NF4, "--model.init_args.adapters=[{targets: [mlp.up_proj], adapter: {kind: l4q}}]"),
            "l4q.* needs the full-precision W",
        ),
        (
            (
                NF4,
                "--model.init_args.adapters=[{targets: [mlp.up_proj], adapter: {kind: lora, init: lora_ga}}]",
            ),
            "init 'lora_ga' needs the full-weight gradient",
        ),
        (
            ("--model.init_args.quantize={scheme: nf4, block_size: 4096}",),
            "block_size=4096 does not divide the weight of 'model.layers.0.self_attn.k_proj' \\(2048 values\\)",
        ),
        (("--model.init_args.prune={ratio: 0.99}",), "leaves no channel of 128"),
    ],
)
def test_bad_combinations_are_one_error_before_training(tmp_path, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=f"error: .*{message}"):
        fit("bad", "--trainer.max_steps=1", *extra)
    assert not list(Path("runs/smoke/bad").glob("*/checkpoints/*.ckpt"))

"""`python -m lightning_moe inspect`: what a saved adapter folder says, checked against the model
and the files it came from."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_moe.adapters import AdapterRule, XLoraConfig, inject, save_adapter
from lightning_moe.cli import main
from lightning_moe.intruders import intruder_count
from lightning_moe.tasks.reasoning import build_causal_lm
from tests.tiny import LLAMA_LINEARS, REPO, TINY_REASONING_LLAMA, write_tiny_experts

SMOKE = str(REPO / "configs/smoke/mole_tiny_llama.yaml")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    """A short smoke fit: its run folder holds config.yaml and the exported MoLE adapter."""
    folder = tmp_path_factory.mktemp("inspect")
    arguments = ["fit", "--config", SMOKE, "--trainer.max_steps=3", "--data.init_args.train_size=24"]
    main([*arguments, f"--trainer.logger.init_args.save_dir={folder}", "--trainer.enable_progress_bar=false"])
    (run,) = folder.glob("mole_tiny_llama/version_*")
    return run


def inspect_json(capsys, *arguments: str) -> dict:
    capsys.readouterr()
    report = main(["inspect", *arguments, "--json"])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(report))
    return report


def test_inspect_reports_rules_layers_parameters_and_fingerprint(smoke_run, capsys):
    report = inspect_json(capsys, str(smoke_run / "adapter"))
    moe, lora = report["rules"]
    assert (moe["kind"], moe["options"]["num_experts"], moe["options"]["top_k"]) == ("moe", 4, 1)
    assert len(moe["layers"]) == 6 and lora["layers"] == ["lm_head"]  # 2 blocks x 3 MLP linears
    weights = load_file(smoke_run / "adapter/adapter_model.safetensors")
    lm_head = sum(t.numel() for k, t in weights.items() if k.startswith("lm_head."))
    assert lora["parameters"] == lm_head == 16 * (64 + 259)
    assert moe["parameters"] + lora["parameters"] == report["trainable_parameters"]
    assert report["trainable_parameters"] == sum(t.numel() for t in weights.values())
    assert report["fingerprint"]["layers"] == 7


def test_inspect_prints_tables_a_person_can_read(smoke_run, capsys):
    main(["inspect", str(smoke_run / "adapter")])
    out = capsys.readouterr().out
    assert "rules" in out and "mlp.gate_proj" in out and "num_experts=4" in out
    assert "trainable parameters in all:" in out


def test_inspect_with_data_routes_validation_batches(smoke_run, capsys):
    # --base defaults to the run's own config.yaml beside the adapter folder
    report = inspect_json(capsys, str(smoke_run / "adapter"), "--data", "--batches=2")
    assert "matches the fingerprint of 7 layers" in report["base_check"]
    routing = report["routing"]
    assert sorted(routing["layers"]) == sorted(name for name in report["rules"][0]["layers"])
    for layer in routing["layers"].values():
        assert len(layer["load"]) == 4 and sum(layer["load"]) == pytest.approx(1.0)
        assert 0.0 <= layer["entropy"] <= 1.0
        assert layer["dead_experts"] == sum(share == 0 for share in layer["load"])
    assert 1.0 <= routing["summary"]["max_load"] <= 4.0


def test_inspect_refuses_a_different_base(smoke_run, tmp_path):
    other_base = tmp_path / "other_base.yaml"
    other_base.write_text("model:\n  init_args:\n    model_seed: 1\n")  # same shapes, other weights
    with pytest.raises(SystemExit) as stopped:
        main(
            ["inspect", str(smoke_run / "adapter"), "--base", str(smoke_run / "config.yaml"), str(other_base)]
        )
    message = str(stopped.value.code)
    assert message.startswith("error: ") and "saved from a different base model" in message, message


def test_inspect_names_mixture_experts_and_whether_they_changed(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    experts = ["experts/a", "experts/b"]
    write_tiny_experts(experts)
    model = build_causal_lm(None, TINY_REASONING_LLAMA, 0, torch.float32)
    rules = [AdapterRule(targets=LLAMA_LINEARS, adapter=XLoraConfig(experts=experts))]
    inject(model, rules)
    save_adapter(model, rules, "mixture")
    statuses = [e["status"] for e in inspect_json(capsys, "mixture")["rules"][0]["experts"]]
    assert statuses == ["matches", "matches"]

    shutil.rmtree("experts/b")
    write_tiny_experts(["experts/b"], seed=7)  # retrained: same shapes, other weights
    shutil.move("experts/a", "experts/gone")
    statuses = [e["status"] for e in inspect_json(capsys, "mixture")["rules"][0]["experts"]]
    assert statuses == ["missing", "changed"]


def test_inspect_of_a_folder_that_is_not_an_adapter_is_one_error(tmp_path):
    with pytest.raises(SystemExit) as stopped:
        main(["inspect", str(tmp_path)])
    assert str(stopped.value.code).startswith("error: ") and str(tmp_path) in str(stopped.value.code)


def test_intruder_count_on_hand_built_spectra():
    weight = torch.diag(torch.arange(8.0, 0.0, -1.0))  # left singular vectors: the axes
    spread = torch.full((8, 1), 8**-0.5)  # |cos| 0.35 with every axis
    assert intruder_count(weight, torch.zeros(8, 8), top_k=3) == 0
    assert intruder_count(weight, 20 * spread @ spread.T, top_k=3) == 1
    assert intruder_count(weight, 20 * spread @ spread.T, top_k=3, epsilon=0.3) == 0
    axis = torch.zeros(8, 1)
    axis[5] = 1.0  # a boosted base direction is no intruder
    assert intruder_count(weight, 30 * axis @ axis.T, top_k=3) == 0


def test_inspect_intruders_reports_every_layer_and_expert(smoke_run, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = main(
        [
            "inspect",
            "intruders",
            str(smoke_run / "adapter"),
            "--top_k=4",
            f"--output={tmp_path / 'r.md'}",
            f"--logdir={tmp_path / 'tb'}",
        ]
    )
    table = result["table"]
    assert set(table["model.layers.0.mlp.up_proj"]) == {f"expert {e}" for e in range(4)}
    assert set(table["lm_head"]) == {"update"}
    assert all(0 <= count <= 4 for row in table.values() for count in row.values())
    report = (tmp_path / "r.md").read_text()
    assert "| layer | update | expert 0 |" in report and "lm_head" in report
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "histograms": 0}).Reload()
    assert "intruders/count" in events.Tags()["histograms"]
    assert "intruders/layers_by_expert" in events.Tags()["images"]

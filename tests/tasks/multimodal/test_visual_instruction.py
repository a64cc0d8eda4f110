"""Visual instruction tuning through the real CLI: tiny LM, tiny timm encoder, generated data."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.tiny import REPO

CONFIGS = REPO / "configs/multimodal"


@pytest.fixture
def run(run_config):
    """run(config name, subcommand, *args): the CLI on a multimodal config with tiny parts."""
    return lambda name, subcommand, *args: run_config(CONFIGS / name, subcommand, *args)


def test_align_then_instruct_with_complete_checkpoints(run, tmp_path):
    align = run("align_smollm2.yaml", "fit", "--trainer.max_steps=3")
    trained = [n for n, p in align.model.named_parameters() if p.requires_grad]
    assert trained and all(n.startswith("model.projector.") for n in trained)
    projector_file = tmp_path / "runs/multimodal/align/fit/adapter/projector.safetensors"
    aligned = load_file(projector_file)

    mole = run(
        "mole_smollm2.yaml",
        "fit",
        "--trainer.max_steps=2",
        f"--model.init_args.projector_path={projector_file}",
        "--model.init_args.optimizer.init_args.lr=0.0",  # keep weights fixed: compare the start
        "--model.init_args.extra_lr=0.0",
    )
    for key, value in aligned.items():
        assert torch.equal(mole.model.model.projector.state_dict()[key], value), key

    (last,) = tmp_path.rglob("mole_smollm2/version_0/checkpoints/last.ckpt")
    state = torch.load(last, weights_only=True)["state_dict"]
    assert any(".projector." in k for k in state) and any(".router." in k for k in state)
    assert any(".experts.lora_A" in k for k in state) and any(
        ".self_attn.q_proj.adapter.lora_A" in k for k in state
    )
    assert not any("base_layer" in k or ".vision." in k for k in state)


def test_checkpoint_reloads_to_identical_outputs_and_test_logs_domains(run, tmp_path):
    first = run("mole_smollm2.yaml", "fit", "--trainer.max_steps=3")
    (last,) = tmp_path.rglob("checkpoints/last.ckpt")
    batch = next(iter(first.datamodule.test_dataloader()))
    first.model.eval()
    with torch.no_grad():
        expected = first.model.model(
            batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
        ).logits

    tested = run("mole_smollm2.yaml", "test", f"--ckpt_path={last}")
    tested.model.eval()
    with torch.no_grad():
        again = tested.model.model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
    torch.testing.assert_close(again, expected, rtol=0, atol=0)
    metrics = tested.trainer.callback_metrics
    assert {"test/accuracy/digits", "test/accuracy/grid", "test/accuracy/textile"} <= set(metrics)
    shares = [float(metrics[f"test/expert_share/digits/{e}"]) for e in range(4)]
    assert sum(shares) == pytest.approx(1.0)
    (events,) = tmp_path.rglob("mole_smollm2/version_1/events*")
    accumulator = EventAccumulator(str(events), size_guidance={"tensors": 0})
    accumulator.Reload()
    assert "test/domain_expert_share" in accumulator.Tags()["images"]
    (samples,) = accumulator.Tensors("test/samples/text_summary")
    table = samples.tensor_proto.string_val[0].decode().splitlines()
    assert table[0] == "| domain | question | generation | answer | match |"
    assert len(table) == 2 + min(6, len(batch["domain"]))


def test_predict_answers_a_question_about_an_image_file(run, tmp_path):
    first = run("lora_smollm2.yaml", "fit", "--trainer.max_steps=2")
    adapter = next((tmp_path / "runs/multimodal/lora_smollm2").rglob("adapter"))
    assert {p.name for p in adapter.iterdir()} >= {"adapter_config.json", "projector.safetensors"}
    image = tmp_path / "question.png"
    Image.new("RGB", (20, 20), (255, 0, 0)).save(image)
    run(
        "lora_smollm2.yaml",
        "predict",
        f"--model.init_args.adapter_path={adapter}",
        f"--model.init_args.projector_path={tmp_path / 'nowhere.safetensors'}",  # the adapter's own wins
        f"--data.init_args.predict_image={image}",
        "--data.init_args.predict_question=What colour is this?",
        "--trainer.callbacks=[{class_path: lightning_moe.callbacks.JsonlPredictionWriter, init_args: {path: answer.jsonl}}]",
    )
    (record,) = [json.loads(line) for line in Path("answer.jsonl").read_text().splitlines()]
    assert set(record) == {"domain", "question", "reference", "generation"}
    assert record["question"] == "What colour is this?" and isinstance(record["generation"], str)
    projector = load_file(adapter / "projector.safetensors")
    for key, value in projector.items():
        assert torch.equal(first.model.model.projector.state_dict()[key], value)
    with pytest.raises(SystemExit, match="predict_image .*missing.png does not exist"):
        run("lora_smollm2.yaml", "predict", f"--data.init_args.predict_image={tmp_path / 'missing.png'}")


def test_fit_resumes_from_its_checkpoint(run, tmp_path):
    checkpoint_every_step = (
        "--trainer.callbacks=[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, "
        "init_args: {every_n_train_steps: 1, save_top_k: -1}}]"
    )
    run("mole_smollm2.yaml", "fit", "--trainer.max_steps=2", checkpoint_every_step)
    (step2,) = tmp_path.rglob("*step=2.ckpt")
    resumed = run(
        "mole_smollm2.yaml", "fit", "--trainer.max_steps=3", f"--ckpt_path={step2}", checkpoint_every_step
    )
    assert resumed.trainer.global_step == 3
    saved = torch.load(step2, weights_only=True)["state_dict"]
    projector = {k: v for k, v in saved.items() if ".projector." in k}
    assert projector and any(not torch.equal(resumed.model.state_dict()[k], v) for k, v in projector.items())

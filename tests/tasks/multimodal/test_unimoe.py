"""Uni-MoE's progressive recipe as chained configs through the real CLI (tiny parts): connector,
modality-specific LoRAs on single-modality data, then unified tuning whose experts start from
them and whose routers respect each sample's modality; and the per-modality routing records."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_moe.adapters import adapted_layers
from lightning_moe.data.llava import AUDIO_TOKEN
from tests.tiny import REPO

CONFIGS = REPO / "configs/multimodal"
ALIGNED = "runs/multimodal/align/fit/adapter/projector.safetensors"
IMAGE_STAGE = "runs/multimodal/unimoe_image_experts/fit/adapter"
TEXT_STAGE = "runs/multimodal/unimoe_text_experts/fit/adapter"
MIX = "--data.init_args.domains=[digits, grid, arithmetic]"


@pytest.fixture
def run(run_config):
    return lambda name, subcommand, *args: run_config(CONFIGS / name, subcommand, *args)


def lora_factors(folder, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    weights = load_file(f"{folder}/adapter_model.safetensors")
    (a,) = [v for k, v in weights.items() if layer in k and k.endswith("lora_A")]
    (b,) = [v for k, v in weights.items() if layer in k and k.endswith("lora_B")]
    return a, b


def test_the_stages_chain_and_the_unified_model_starts_from_the_modality_experts(run, tmp_path):
    run("align_smollm2.yaml", "fit", "--trainer.max_steps=2")
    image = run(
        "unimoe_image_experts.yaml",
        "fit",
        "--trainer.max_steps=2",
        f"--model.init_args.projector_path={ALIGNED}",
    )
    assert set(image.datamodule.domains) == {"digits", "grid", "textile"}
    text = run(
        "unimoe_text_experts.yaml",
        "fit",
        "--trainer.max_steps=2",
        f"--model.init_args.projector_path={ALIGNED}",
        "--data.init_args.domains=[arithmetic]",
    )
    assert text.datamodule.splits["train"] and all(e.image is None for e in text.datamodule.splits["train"])

    unified = run(
        "unimoe_smollm2.yaml",
        "fit",
        "--trainer.max_steps=1",
        MIX,
        f"--model.init_args.projector_path={IMAGE_STAGE}/projector.safetensors",
        "--model.init_args.optimizer.init_args.lr=0.0",  # weights stay at their start
        "--model.init_args.router_lr=0.0",
        "--model.init_args.extra_lr=0.0",
    )
    layers = dict(adapted_layers(unified.model.model))
    name = "language_model.model.layers.1.mlp.up_proj"
    experts = layers[name].adapter.experts
    for expert, folder in ((0, IMAGE_STAGE), (1, TEXT_STAGE)):
        a, b = lora_factors(folder, name)
        rank = a.shape[0]
        torch.testing.assert_close(experts.lora_A[expert, :rank], a)
        torch.testing.assert_close(
            experts.lora_B[expert, :, :rank] * experts.scaling, b * 2.0
        )  # alpha 16 / rank 8
        assert torch.all(experts.lora_A[expert, rank:] == 0)
    projector = load_file(f"{IMAGE_STAGE}/projector.safetensors")
    for key, value in projector.items():
        torch.testing.assert_close(unified.model.model.projector.state_dict()[key], value)

    # each sample's tokens route only among its modality's experts and the shared ones
    batch = next(iter(unified.datamodule.test_dataloader()))
    unified.model.eval()
    with unified.model.injection.collector.capture() as records, torch.no_grad():
        unified.model.task_loss(batch)
    chosen = records[name].indices  # [batch, tokens, 2]
    real = batch["attention_mask"].bool()
    for row, domain in enumerate(batch["domain"]):
        used = set(chosen[row][real[row]].flatten().tolist())
        assert used <= ({1, 2, 3} if domain == "arithmetic" else {0, 2, 3}), (domain, used)


def test_test_runs_log_routing_per_modality_and_mutual_information_per_layer(run, tmp_path):
    run("mole_smollm2.yaml", "fit", "--trainer.max_steps=2")
    (adapter,) = tmp_path.rglob("mole_smollm2/version_0/adapter")
    tested = run("mole_smollm2.yaml", "test", f"--model.init_args.adapter_path={adapter}")
    metrics = tested.trainer.callback_metrics
    assert not any(name.startswith("test/modality_expert_share/audio/") for name in metrics)
    for modality in ("text", "image"):
        shares = [float(metrics[f"test/modality_expert_share/{modality}/{e}"]) for e in range(4)]
        assert sum(shares) == pytest.approx(1.0)
    assert 0.0 <= float(metrics["test/domain_expert_mi/mean"]) <= float(metrics["test/domain_expert_mi/max"])
    assert float(metrics["test/domain_expert_mi/max"]) <= 1.59  # log2 of the 3 domains

    (record_file,) = tmp_path.rglob("mole_smollm2/version_1/test_domain_routing.json")
    record = json.loads(record_file.read_text())
    assert sorted(record["groups"]) == ["digits", "grid", "textile"]
    layers = record["layers"]
    assert len(layers) == 2 * 3  # 2 blocks x the MLP's 3 linears
    counts = torch.tensor(layers["language_model.model.layers.0.mlp.down_proj"]["counts"])
    tokens = int(sum(batch["attention_mask"].sum() for batch in tested.datamodule.test_dataloader()))
    assert counts.shape == (3, 4) and int(counts.sum()) == tokens  # top-1: one choice per real token
    (modality_file,) = tmp_path.rglob("mole_smollm2/version_1/test_modality_routing.json")
    modality = json.loads(modality_file.read_text())
    assert modality["groups"] == ["text", "image"]  # audio: no token, so no row
    image_counts = torch.tensor(modality["layers"]["language_model.model.layers.0.mlp.down_proj"]["counts"])[
        1
    ]
    slots = sum(
        int((b["input_ids"] == tested.model.model.image_token_id).sum())
        for b in tested.datamodule.test_dataloader()
    )
    assert int(image_counts.sum()) == slots

    (events,) = tmp_path.rglob("mole_smollm2/version_1/events*")
    accumulator = EventAccumulator(str(events), size_guidance={"images": 0})
    accumulator.Reload()
    images = set(accumulator.Tags()["images"])
    assert {"test/domain_expert_share", "test/domain_expert_mi", "test/modality_expert_share"} <= images


def test_token_scope_sends_image_slots_and_text_tokens_to_their_own_experts(run):
    unified = run(
        "unimoe_smollm2.yaml", "fit", "--trainer.max_steps=1", "--model.init_args.modality_scope=token"
    )
    batch = next(iter(unified.datamodule.test_dataloader()))
    unified.model.eval()
    with unified.model.injection.collector.capture() as records, torch.no_grad():
        unified.model.task_loss(batch)
    slots = batch["input_ids"] == unified.model.model.image_token_id
    real = batch["attention_mask"].bool()
    assert slots.any()
    for name, record in records.items():
        chosen = record.indices  # [batch, tokens, 2]
        assert set(chosen[slots].flatten().tolist()) <= {0, 2, 3}, name
        assert set(chosen[real & ~slots].flatten().tolist()) <= {1, 2, 3}, name
    # generation: each new token is text, so it never reaches the image expert (the records
    # keep each layer's last decision: the last generated token's)
    with unified.model.injection.collector.capture() as records, torch.no_grad():
        unified.model.generate(batch)
    assert records and all(r.indices.shape[1] == 1 for r in records.values())
    assert all(0 not in r.indices.flatten().tolist() for r in records.values())


AUDIO_ENCODER = "runs/multimodal/audio_encoder"
AUDIO_STAGE = "runs/multimodal/unimoe_audio_experts/fit/adapter"


def test_the_audio_chain_runs_and_spoken_samples_use_the_audio_expert(run, tmp_path):
    """Stage 0 (the audio encoder), the audio connector and the audio LoRA, then unified tuning
    with image, text and audio experts (experts 0, 1, 2; 3 and 4 shared), all through the CLI."""
    encoder = run("audio_encoder.yaml", "fit", "--trainer.max_epochs=1")
    assert "val/accuracy" in encoder.trainer.callback_metrics
    assert (tmp_path / AUDIO_ENCODER / "audio_encoder.safetensors").is_file()
    run("align_smollm2.yaml", "fit", "--trainer.max_steps=2")
    aligned = run(
        "unimoe_audio_align.yaml",
        "fit",
        "--trainer.max_steps=2",
        f"--model.init_args.projector_path={ALIGNED}",
        "--data.init_args.domains=[spoken]",
    )
    assert all(e.audio is not None and e.image is None for e in aligned.datamodule.splits["train"])
    # only the audio projector had data to learn from
    before = load_file(ALIGNED)
    after = load_file(tmp_path / "runs/multimodal/unimoe_audio_align/fit/adapter/projector.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    audio_align = "runs/multimodal/unimoe_audio_align/fit/adapter"
    run(
        "unimoe_audio_experts.yaml",
        "fit",
        "--trainer.max_steps=2",
        f"--model.init_args.projector_path={audio_align}/projector.safetensors",
        f"--model.init_args.audio_projector_path={audio_align}/audio_projector.safetensors",
        "--data.init_args.domains=[spoken]",
    )
    run(
        "unimoe_image_experts.yaml",
        "fit",
        "--trainer.max_steps=1",
        f"--model.init_args.projector_path={ALIGNED}",
    )
    run("unimoe_text_experts.yaml", "fit", "--trainer.max_steps=1", "--data.init_args.domains=[arithmetic]")

    unified = run(
        "unimoe_audio_smollm2.yaml",
        "fit",
        "--trainer.max_steps=1",
        "--data.init_args.domains=[digits, arithmetic, spoken]",
        f"--model.init_args.audio_projector_path={AUDIO_STAGE}/audio_projector.safetensors",
        "--model.init_args.optimizer.init_args.lr=0.0",
        "--model.init_args.router_lr=0.0",
        "--model.init_args.extra_lr=0.0",
    )
    name = "language_model.model.layers.0.mlp.gate_proj"
    experts = dict(adapted_layers(unified.model.model))[name].adapter.experts
    a, _ = lora_factors(AUDIO_STAGE, name)
    torch.testing.assert_close(experts.lora_A[2, : a.shape[0]], a)
    for key, value in load_file(f"{AUDIO_STAGE}/audio_projector.safetensors").items():
        torch.testing.assert_close(unified.model.model.audio_projector.state_dict()[key], value)

    unified.model.eval()
    allowed = {"digits": {0, 3, 4}, "arithmetic": {1, 3, 4}, "spoken": {2, 3, 4}}
    seen = set()
    for batch in unified.datamodule.test_dataloader():
        with unified.model.injection.collector.capture() as records, torch.no_grad():
            unified.model.task_loss(batch)
        chosen, real = records[name].indices, batch["attention_mask"].bool()
        for row, domain in enumerate(batch["domain"]):
            used = set(chosen[row][real[row]].flatten().tolist())
            assert used <= allowed[domain], (domain, used)
            seen.add(domain)
        if "spoken" in batch["domain"]:
            assert batch["audio_features"].shape[0] == batch["domain"].count("spoken")
    assert seen == set(allowed)

    tested = run(
        "unimoe_audio_smollm2.yaml",
        "test",
        "--data.init_args.domains=[digits, arithmetic, spoken]",
        f"--model.init_args.adapter_path={next(tmp_path.rglob('unimoe_audio_smollm2/version_0/adapter'))}",
    )
    metrics = tested.trainer.callback_metrics
    assert "test/accuracy/spoken" in metrics
    shares = [float(metrics[f"test/modality_expert_share/audio/{e}"]) for e in range(5)]
    assert (
        sum(shares) == pytest.approx(1.0) and shares[0] == shares[1] == 0.0
    )  # audio slots: expert 2 or shared

    # ask about one audio file: the answer comes from the audio slots
    wav = next((tmp_path / "cache").rglob("spoken/*.wav"))
    adapter = next(tmp_path.rglob("unimoe_audio_smollm2/version_0/adapter"))
    asked = run(
        "unimoe_audio_smollm2.yaml",
        "predict",
        f"--model.init_args.adapter_path={adapter}",
        f"--data.init_args.predict_audio={wav}",
        "--data.init_args.predict_question=Which digit is spoken?",
        "--trainer.callbacks=[{class_path: lightning_moe.callbacks.JsonlPredictionWriter, init_args: {path: heard.jsonl}}]",
    )
    (example,) = asked.datamodule._predict_examples()
    assert example.audio == wav and example.input_ids.count(asked.datamodule.slots[AUDIO_TOKEN][0]) == 2
    (record,) = [json.loads(line) for line in (tmp_path / "heard.jsonl").read_text().splitlines()]
    assert record["question"] == "Which digit is spoken?" and isinstance(record["generation"], str)

"""The text-to-image task on a tiny UNet: its loss pieces, caption cache, exports, and the judged
predictions of composed concept LoRAs."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from lightning_moe.adapters import AdapterRule, LoraConfig
from lightning_moe.adapters.files import read_safetensors
from lightning_moe.errors import UserInputError
from lightning_moe.tasks.diffusion import TextToImageTask, UNetTrainingTask
from lightning_moe.tasks.diffusion.concept_judge import ConceptJudge, save_concept_judge
from tests.tiny import REPO, TINY_TEXT_ENCODER, TINY_UNET
from tests.tolerances import assert_same_maths

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


TINY = {"unet_config": TINY_UNET, "text_encoder_config": TINY_TEXT_ENCODER, "tokenizer": "bytes"}


def task(**kwargs) -> TextToImageTask:
    """The LoRA stage on a tiny UNet, its model configured."""
    built = TextToImageTask(**(TINY | {"adapters": [AdapterRule(ATTENTION, LoraConfig(rank=2))]} | kwargs))
    built.configure_model()
    return built


def base_task() -> UNetTrainingTask:
    """The base stage on a tiny UNet, its model configured."""
    built = UNetTrainingTask(**TINY)
    built.configure_model()
    return built


def test_cached_caption_states_equal_encoding_the_batch_directly():
    model = task()
    model.model.text_encoder.double()  # cached rows were encoded in another batch: other kernels
    captions = ["a bag", "a sneaker, inverted", "", "a bag"]
    states, mask = model.encode_captions(captions)
    assert len(model.caption_states) == 3
    tokens = model.tokenizer(captions, padding=True, return_tensors="pt")
    direct = model.model.text_encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])[
        0
    ]
    assert torch.equal(mask, tokens["attention_mask"])
    assert_same_maths(states * mask[..., None], direct * mask[..., None])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_the_formula(prediction_type):
    model = task(prediction_type=prediction_type, min_snr_gamma=5.0)
    timesteps = torch.tensor([0, 10, 500, 999])
    alphas = model.noise_schedule.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    expected = torch.minimum(snr, torch.tensor(5.0)) / (snr + (prediction_type == "v_prediction"))
    torch.testing.assert_close(model.snr_weights(timesteps), expected)
    assert torch.equal(task(min_snr_gamma=None).snr_weights(timesteps), torch.ones(4))


def test_loss_trains_only_the_adapters_or_the_whole_unet():
    batch = {
        "image": torch.rand(3, 1, 8, 8) * 2 - 1,
        "caption": ["a bag", "a shoe", "a bag"],
        "label": [0, 1, 0],
    }
    lora = task()
    lora.task_loss(batch)[0].backward()
    trained = {name for name, p in lora.named_parameters() if p.grad is not None}
    assert trained and all(".adapter." in name for name in trained)
    base = base_task()
    base.task_loss(batch)[0].backward()
    assert all(p.grad is not None for p in base.model.unet.parameters())
    assert all(p.grad is None for p in base.model.text_encoder.parameters())


def test_exports_the_base_unet_and_the_lora_in_both_formats(tmp_path):
    base = base_task()
    base.export(str(tmp_path / "base"))
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "base/unet")
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, base.model.unet.state_dict()[name])
    lora = task(unet_path=str(tmp_path / "base/unet"), unet_config=None)
    lora.export(str(tmp_path / "lora"))
    ours = read_safetensors(tmp_path / "lora/adapter_model.safetensors")
    theirs = read_safetensors(tmp_path / "lora/pytorch_lora_weights.safetensors")
    assert len(theirs) == len(ours) and all(key.startswith("unet.") for key in theirs)


def test_bad_base_settings_are_one_clear_error(tmp_path):
    with pytest.raises(UserInputError, match="holds no trained UNet"):
        task(unet_path=str(tmp_path), unet_config=None)
    with pytest.raises(UserInputError, match="cross_attention_dim=16 must equal the text encoder's width 32"):
        task(text_encoder_config=TINY_TEXT_ENCODER | {"hidden_size": 32})


def test_predict_writes_the_grid_and_judged_records_and_never_overwrites(run_config):
    config = REPO / "configs/diffusion/compose_three.yaml"
    run_config(config, "predict")
    folder = Path("runs/diffusion/compose/three/merge")
    records = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    assert [record["prompt"] for record in records[:2]] == [
        "a handwritten digit 0, inverted, framed",
        "a handwritten digit 1, inverted, framed",
    ]
    assert len(records) == 10 and all(record["seconds_per_image"] > 0 for record in records)
    for record in records:
        found = [record["object_present"], record["inverted_present"], record["framed_present"]]
        assert record["all_present"] == all(found)
        assert record["object_present"] == (record["judged_object"] == "handwritten digit")
    grid = torch.from_numpy(np.array(Image.open(folder / "predictions.png")))
    assert grid.shape[:2] == (2 * (8 + 2) + 2, 8 * (8 + 2) + 2)  # ten 8 px images in rows of 8, 2 px padding
    before = {path: path.read_bytes() for path in folder.iterdir() if path.is_file()}
    with pytest.raises(SystemExit, match="merge already holds a run"):  # the same run folder again
        run_config(config, "predict")
    assert {path: path.read_bytes() for path in folder.iterdir() if path.is_file()} == before


@pytest.mark.parametrize("method", ["LoRAComposer", "CLoRA"])
def test_predict_judges_each_slot_of_the_canvas_prompts(run_config, method):
    composition = {
        "class_path": f"lightning_moe.tasks.diffusion.{method}",
        "init_args": {"concepts": ["handwritten digit", "textile swatch", "framed"]},
    }
    run_config(
        REPO / "configs/diffusion/compose_canvas_three.yaml",
        "predict",
        f"--model.init_args.composition={json.dumps(composition)}",
        f"--trainer.logger.init_args.version={method}",
    )
    folder = Path(f"runs/diffusion/compose_canvas/three/{method}")
    records = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    assert [record["prompt"] for record in records] == [
        "a handwritten digit on the left and a textile swatch on the right, framed",
        "a textile swatch on the left and a handwritten digit on the right, framed",
    ]
    for record in records:
        assert set(record["judged_slots"]) == {"left", "right"} and record["seconds_per_image"] > 0
        for slot, expected in record["slots"].items():
            assert record[f"{slot}_present"] == (record["judged_slots"][slot] == expected)
        found = [record["left_present"], record["right_present"], record["framed_present"]]
        assert record["all_present"] == all(found)
    grid = torch.from_numpy(np.array(Image.open(folder / "predictions.png")))
    assert grid.shape[:2] == (4 + 4, 2 * (8 + 2) + 2)  # two 4 x 8 canvases in one row, 2 px padding


def test_a_judge_that_does_not_know_a_prompted_concept_is_one_clear_error(run_config, tmp_path):
    save_concept_judge(
        ConceptJudge("resnet10t", ["handwritten digit"], ["inverted"], seed=0),
        "resnet10t",
        tmp_path / "judge",
    )
    with pytest.raises(SystemExit, match="cannot judge 'framed'"):
        run_config(
            REPO / "configs/diffusion/compose_three.yaml",
            "predict",
            f"--model.init_args.judge_path={tmp_path}/judge",
        )


def test_a_trained_gate_exports_in_our_format_only(run_config):
    run_config(REPO / "configs/diffusion/gate_concepts.yaml", "fit", "--trainer.max_steps=1")
    gate = Path("runs/diffusion/gate")
    assert (gate / "adapter_config.json").is_file() and not (
        gate / "pytorch_lora_weights.safetensors"
    ).exists()

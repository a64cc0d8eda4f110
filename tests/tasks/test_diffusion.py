"""The text-to-image task on a tiny UNet: its loss pieces, caption cache and exports."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from lightning_moe.adapters import AdapterRule, LoraConfig
from lightning_moe.adapters.errors import UserInputError
from lightning_moe.adapters.files import read_safetensors
from lightning_moe.tasks.diffusion import TextToImageTask
from tests.conftest import TINY_TEXT_ENCODER, TINY_UNET

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def task(**kwargs) -> TextToImageTask:
    settings = {
        "unet_config": TINY_UNET,
        "text_encoder_config": TINY_TEXT_ENCODER,
        "tokenizer": "bytes",
        "adapters": [AdapterRule(ATTENTION, LoraConfig(rank=2))],
    }
    built = TextToImageTask(**(settings | kwargs))
    built.configure_model()
    return built


def test_cached_caption_states_equal_encoding_the_batch_directly():
    model = task()
    captions = ["a bag", "a sneaker, inverted", "", "a bag"]
    states, mask = model.encode_captions(captions)
    assert len(model.caption_states) == 3
    tokens = model.tokenizer(captions, padding=True, return_tensors="pt")
    direct = model.model.text_encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])[
        0
    ]
    assert torch.equal(mask, tokens["attention_mask"])
    torch.testing.assert_close(states * mask[..., None], direct * mask[..., None], rtol=1e-5, atol=1e-6)


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
    base = task(adapters=[], train_unet=True)
    base.task_loss(batch)[0].backward()
    assert all(p.grad is not None for p in base.model.unet.parameters())
    assert all(p.grad is None for p in base.model.text_encoder.parameters())


def test_exports_the_base_unet_and_the_lora_in_both_formats(tmp_path):
    base = task(adapters=[], train_unet=True)
    base.export_adapter(str(tmp_path / "base"))
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "base/unet")
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, base.model.unet.state_dict()[name])
    lora = task(unet_path=str(tmp_path / "base/unet"), unet_config=None)
    lora.export_adapter(str(tmp_path / "lora"))
    ours = read_safetensors(tmp_path / "lora/adapter_model.safetensors")
    theirs = read_safetensors(tmp_path / "lora/pytorch_lora_weights.safetensors")
    assert len(theirs) == len(ours) and all(key.startswith("unet.") for key in theirs)


def test_bad_base_settings_are_one_clear_error(tmp_path):
    with pytest.raises(UserInputError, match="holds no trained UNet"):
        task(unet_path=str(tmp_path), unet_config=None)
    with pytest.raises(UserInputError, match="cross_attention_dim=16 must equal the text encoder's width 32"):
        task(text_encoder_config=TINY_TEXT_ENCODER | {"hidden_size": 32})
    with pytest.raises(UserInputError, match="give `adapters: \\[\\]` with it"):
        TextToImageTask(
            unet_config=TINY_UNET,
            train_unet=True,
            tokenizer="bytes",
            adapters=[AdapterRule(ATTENTION, LoraConfig())],
        )

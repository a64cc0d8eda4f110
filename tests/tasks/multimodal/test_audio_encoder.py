"""The audio encoder: its shapes, its export round trip and errors, and that stage 0 learns spoken
digits well enough to tell held-out voices apart; and the audio slots of the vision-language model."""

import lightning as L
import pytest
import torch

from lightning_moe.adapters.errors import AdapterCheckpointError
from lightning_moe.data.spoken_digits import FRAMES, MELS, SpokenDigitDataModule
from lightning_moe.errors import UserInputError
from lightning_moe.tasks.multimodal.audio_encoder import (
    ENCODER_CONFIG,
    AudioEncoder,
    SpokenDigitTask,
    load_audio_encoder,
    save_audio_encoder,
)
from lightning_moe.tasks.multimodal.vision_language import VisionLanguageModel, build_vision_encoder
from lightning_moe.tasks.reasoning.causal_lm import build_causal_lm

IMAGE_TOKEN_ID, AUDIO_TOKEN_ID = 3, 4


def test_encoder_gives_tokens_and_ignores_the_recording_level():
    encoder = AudioEncoder(width=16, tokens=4)
    features = torch.randn(3, MELS, FRAMES)
    tokens = encoder(features)
    assert tokens.shape == (3, 4, 16)
    torch.testing.assert_close(encoder(2.0 * features - 5.0), tokens, atol=1e-5, rtol=1e-4)


def test_export_round_trip_and_errors(tmp_path):
    encoder = AudioEncoder(width=16, tokens=2, seed=3)
    save_audio_encoder(encoder, tmp_path / "enc")
    loaded = load_audio_encoder(tmp_path / "enc")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    features = torch.randn(2, MELS, FRAMES)
    torch.testing.assert_close(loaded(features), encoder(features))
    with pytest.raises(UserInputError, match=r"no audio encoder in .*nowhere \(no audio_encoder.json\)"):
        load_audio_encoder(tmp_path / "nowhere")
    (tmp_path / "enc" / ENCODER_CONFIG).write_text('{"width": 32, "tokens": 2}')
    with pytest.raises(AdapterCheckpointError, match="the weights do not fit audio_encoder.json"):
        load_audio_encoder(tmp_path / "enc")


def test_stage_zero_learns_digits_that_held_out_voices_speak(tmp_path):
    data = SpokenDigitDataModule(train_size=200, test_size=50, batch_size=20, cache_dir=str(tmp_path))
    task = SpokenDigitTask(width=32, tokens=4, optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3))
    trainer = L.Trainer(
        max_epochs=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, check_val_every_n_epoch=8,
    )  # fmt: skip
    trainer.fit(task, data)
    assert float(trainer.callback_metrics["val/accuracy"]) > 0.5  # chance: 0.1


@pytest.fixture
def audio_vlm(tiny_llama_config) -> VisionLanguageModel:
    torch.manual_seed(0)
    vision = build_vision_encoder("test_efficientnet", pretrained=False)
    language_model = build_causal_lm(None, tiny_llama_config, 0, torch.float32)
    audio = AudioEncoder(width=16, tokens=2).requires_grad_(False)
    return VisionLanguageModel(vision, language_model, IMAGE_TOKEN_ID, audio, AUDIO_TOKEN_ID)


def test_audio_tokens_replace_the_audio_slots_in_order(audio_vlm):
    features = torch.randn(2, MELS, FRAMES)
    audio = audio_vlm.audio_embeddings(features)
    rows = [[5, AUDIO_TOKEN_ID, AUDIO_TOKEN_ID, 7], [AUDIO_TOKEN_ID, AUDIO_TOKEN_ID, 8, 0]]
    input_ids = torch.tensor(rows)
    mask = (input_ids != 0).long()
    reference = audio_vlm.language_model.get_input_embeddings()(input_ids).detach().clone()
    reference[0, 1:3], reference[1, 0:2] = audio[0], audio[1]
    expected = audio_vlm.language_model(inputs_embeds=reference, attention_mask=mask).logits
    output = audio_vlm(input_ids, mask, None, labels=input_ids, audio_features=features)
    torch.testing.assert_close(output.logits, expected)
    output.loss.backward()
    assert all(p.grad is not None for p in audio_vlm.audio_projector.parameters())
    assert all(p.grad is None for p in audio_vlm.projector.parameters())  # no image in the batch


def test_audio_slot_errors(audio_vlm, tiny_llama_config):
    features = torch.randn(1, MELS, FRAMES)
    with pytest.raises(UserInputError, match="has 1 audio-token slots for 1 audios of 2 tokens"):
        audio_vlm(torch.tensor([[5, AUDIO_TOKEN_ID]]), audio_features=features)
    with pytest.raises(UserInputError, match="audio-token slots but the batch has no audios"):
        audio_vlm(torch.tensor([[5, AUDIO_TOKEN_ID, AUDIO_TOKEN_ID]]))
    no_audio = VisionLanguageModel(audio_vlm.vision, audio_vlm.language_model, IMAGE_TOKEN_ID)
    with pytest.raises(UserInputError, match="the batch has audio, but the model has no audio encoder"):
        no_audio(torch.tensor([[5, 6]]), audio_features=features)
    with pytest.raises(UserInputError, match="an audio encoder needs its audio_token"):
        VisionLanguageModel(audio_vlm.vision, audio_vlm.language_model, IMAGE_TOKEN_ID, audio_vlm.audio)

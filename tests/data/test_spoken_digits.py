"""Spoken digits: espeak-ng utterances with held-out test voices, WAV reading, log-mel features,
and one clear error when the synthesiser is missing."""

import random
import wave

import numpy as np
import pytest

from lightning_moe.data.llava import AUDIO_TOKEN, read_llava, write_llava_dataset
from lightning_moe.data.spoken_digits import (
    FRAMES,
    MELS,
    SAMPLE_RATE,
    SpokenDigitDataModule,
    draw_utterances,
    fixed_window,
    log_mel,
    read_wav,
    wav_features,
    write_utterances,
)
from lightning_moe.errors import UserInputError


def test_splits_share_no_voice_and_hold_every_digit_equally():
    train = draw_utterances("train", 40, random.Random(0))
    test = draw_utterances("test", 20, random.Random(0))
    assert not {u.voice for u in train} & {u.voice for u in test}
    assert sorted(u.digit for u in train) == sorted(list(range(10)) * 4)
    with pytest.raises(UserInputError, match="split must be one of"):
        draw_utterances("val", 1, random.Random(0))


def test_utterances_are_wav_files_whose_features_tell_digits_apart(tmp_path):
    utterances = draw_utterances("train", 20, random.Random(1))
    paths = write_utterances(tmp_path / "spoken", utterances)
    samples = read_wav(paths[0])
    assert samples.dtype == np.float32 and 0.1 < len(samples) / SAMPLE_RATE < 2.0
    assert np.abs(samples).max() > 0.05  # speech, not silence
    features = np.stack([wav_features(p) for p in paths])
    assert features.shape == (20, MELS, FRAMES) and np.isfinite(features).all()
    # the same word in two voices is closer than two different words (mean over pairs)
    flat = features.reshape(20, -1)
    flat = (flat - flat.mean(1, keepdims=True)) / flat.std(1, keepdims=True)
    digits = np.array([u.digit for u in utterances])
    similarity = flat @ flat.T / flat.shape[1]
    same = similarity[(digits[:, None] == digits[None]) & ~np.eye(20, dtype=bool)].mean()
    other = similarity[digits[:, None] != digits[None]].mean()
    assert same > other
    with pytest.raises(UserInputError, match="already exists; choose a new folder"):
        write_utterances(tmp_path / "spoken", utterances)


def test_fixed_window_centres_the_speech_and_log_mel_has_one_frame_per_10_ms():
    samples = np.zeros(SAMPLE_RATE * 2, dtype=np.float32)
    samples[1000:3000] = 0.5
    window = fixed_window(samples)
    assert len(window) == SAMPLE_RATE
    loud = np.flatnonzero(window)
    assert len(loud) == 2000 and abs((loud[0] + loud[-1]) / 2 - SAMPLE_RATE / 2) <= 1
    assert log_mel(samples).shape == (MELS, FRAMES) == (40, 101)
    long = np.full(SAMPLE_RATE * 3, 0.5, dtype=np.float32)
    assert len(fixed_window(long)) == SAMPLE_RATE


def test_bad_audio_files_get_one_clear_error(tmp_path):
    with wave.open(str(tmp_path / "fast.wav"), "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(16000)
        file.writeframes(np.zeros(100, dtype="<i2").tobytes())
    with pytest.raises(UserInputError, match=r"fast.wav: 16000 Hz, 16-bit; expected 22050 Hz 16-bit PCM"):
        read_wav(tmp_path / "fast.wav")
    (tmp_path / "text.wav").write_text("not audio")
    with pytest.raises(UserInputError, match="text.wav: not a readable WAV file"):
        read_wav(tmp_path / "text.wav")


def test_a_missing_synthesiser_is_one_error_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(UserInputError, match=r"needs the espeak-ng synthesiser.*apt-get install espeak-ng"):
        write_llava_dataset(tmp_path / "mm", domains=("spoken",), per_domain=2)
    assert not list(tmp_path.iterdir())


def test_the_spoken_domain_asks_about_audio_files(tmp_path):
    folder = write_llava_dataset(tmp_path / "mm", split="test", domains=("spoken",), per_domain=9, seed=2)
    records = read_llava(folder / "conversations.json", folder / "images")
    assert all(r.image is None and r.audio.suffix == ".wav" for r in records)
    assert all(r.turns[0][1].startswith(AUDIO_TOKEN + "\n") for r in records)
    plain = [r for r in records if r.turns[0][1].endswith(("spoken?", "hear?", "you hear."))]
    assert plain and all(r.turns[1][1] in {str(d) for d in range(10)} for r in plain)
    assert read_wav(records[0].audio).size > 0


def test_data_module_gives_features_and_digits(tmp_path):
    dm = SpokenDigitDataModule(train_size=10, test_size=5, batch_size=4, cache_dir=str(tmp_path))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["features"].shape == (4, MELS, FRAMES) and batch["digit"].dtype.is_floating_point is False
    assert len(dm.splits["test"]) == 5
    again = SpokenDigitDataModule(train_size=10, test_size=5, cache_dir=str(tmp_path))
    again.setup("fit")  # reuses the synthesised files
    assert (again.splits["train"].tensors[0] == dm.splits["train"].tensors[0]).all()

"""Spoken digits: the words "zero".."nine" synthesised by espeak-ng (Debian's `espeak-ng`), and the
log-mel features the audio encoder reads.

No speech corpus ships in any package, so utterances are generated: each draws an English
accent, a voice variant, a speed and a pitch. The test split speaks with voice variants the
training split never uses, so an encoder that passes it has learnt the words, not the voices.
Features come from `transformers.audio_utils` (Hann window, 40 mel bands, log10), one frame per
10 ms of a fixed 1 s window.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import tempfile
import wave
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

from lightning_moe.assets import default_cache_dir
from lightning_moe.data.sampling import resumed_training_sampler
from lightning_moe.data.splits import require_training_examples
from lightning_moe.errors import UserInputError

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc")
VOICES = {
    "train": ("m1", "m2", "m3", "m4", "m5", "m6", "f1", "f2", "f3", "f5"),
    "test": ("m7", "f4"),  # held out: the test split's speakers are new
}
SAMPLE_RATE = 22050  # espeak-ng's output rate
WINDOW_SECONDS = 1.0
HOP = 220  # 10 ms
FFT = 512
MELS = 40
FRAMES = int(WINDOW_SECONDS * SAMPLE_RATE) // HOP + 1  # with centred frames: 101


@dataclass(frozen=True)
class Utterance:
    digit: int
    accent: str
    voice: str
    speed: int  # words per minute
    pitch: int  # espeak-ng's 0..99


def draw_utterances(split: str, count: int, rng: random.Random) -> list[Utterance]:
    """`count` utterances of the split, the digits in equal shares (cycled, then shuffled)."""
    if split not in VOICES:
        raise UserInputError(f"split must be one of {sorted(VOICES)}, got {split!r}")
    digits = [i % 10 for i in range(count)]
    rng.shuffle(digits)
    return [
        Utterance(
            digit, rng.choice(ACCENTS), rng.choice(VOICES[split]), rng.randint(130, 200), rng.randint(25, 75)
        )
        for digit in digits
    ]


def require_espeak() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        raise UserInputError(
            "spoken-digit data needs the espeak-ng synthesiser, which is not on PATH; "
            "install it with `apt-get install espeak-ng` (only the audio domain needs it)"
        )
    return path


def speak(utterance: Utterance, path: Path) -> None:
    """Write the utterance as a 16-bit mono WAV file at `path`."""
    voice = f"{utterance.accent}+{utterance.voice}"
    command = [require_espeak(), "-v", voice, "-s", str(utterance.speed), "-p", str(utterance.pitch)]
    subprocess.run([*command, "-w", str(path), DIGIT_WORDS[utterance.digit]], check=True, capture_output=True)


def write_utterances(folder: Path, utterances: list[Utterance]) -> list[Path]:
    """One WAV file per utterance in `folder` (which must not exist yet), built beside it and renamed."""
    if folder.exists():
        raise UserInputError(f"{folder} already exists; choose a new folder (nothing was overwritten)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        for index, utterance in enumerate(utterances):
            speak(utterance, staging / f"{index:06d}.wav")
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [folder / f"{index:06d}.wav" for index in range(len(utterances))]


def read_wav(path: str | Path) -> np.ndarray:
    """A 16-bit PCM WAV file at 22050 Hz as float32 samples in [-1, 1] (channels averaged)."""
    try:
        with wave.open(str(path)) as file:
            rate, width, channels = file.getframerate(), file.getsampwidth(), file.getnchannels()
            frames = file.readframes(file.getnframes())
    except (wave.Error, EOFError, FileNotFoundError) as error:
        raise UserInputError(f"audio file {path}: not a readable WAV file ({error})") from None
    if rate != SAMPLE_RATE or width != 2:
        raise UserInputError(
            f"audio file {path}: {rate} Hz, {8 * width}-bit; expected {SAMPLE_RATE} Hz 16-bit PCM"
        )
    samples = np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0
    return samples.reshape(-1, channels).mean(axis=1)


def fixed_window(samples: np.ndarray, threshold: float = 0.02) -> np.ndarray:
    """The speech (leading and trailing silence cut), centred in a window of WINDOW_SECONDS."""
    loud = np.flatnonzero(np.abs(samples) > threshold)
    speech = samples[loud[0] : loud[-1] + 1] if len(loud) else samples[:0]
    length = int(WINDOW_SECONDS * SAMPLE_RATE)
    if len(speech) > length:
        start = (len(speech) - length) // 2
        return speech[start : start + length]
    window = np.zeros(length, dtype=np.float32)
    start = (length - len(speech)) // 2
    window[start : start + len(speech)] = speech
    return window


_MEL_FILTERS = mel_filter_bank(
    num_frequency_bins=FFT // 2 + 1,
    num_mel_filters=MELS,
    min_frequency=20.0,
    max_frequency=SAMPLE_RATE / 2,
    sampling_rate=SAMPLE_RATE,
    norm="slaney",
    mel_scale="slaney",
)


def log_mel(samples: np.ndarray) -> np.ndarray:
    """Samples -> log10 mel energies [MELS, FRAMES] of their fixed window."""
    return spectrogram(
        fixed_window(samples),
        window_function(FFT, "hann"),
        frame_length=FFT,
        hop_length=HOP,
        power=2.0,
        mel_filters=_MEL_FILTERS,
        log_mel="log10",
    )


def wav_features(path: str | Path) -> np.ndarray:
    return log_mel(read_wav(path))


def spoken_digit_folder(
    split: str, count: int, seed: int, cache_dir: str | None = None
) -> tuple[Path, list[Utterance]]:
    """The split's WAV files, synthesised once under `<cache>/datasets/` (deterministic for the
    arguments) and reused, with the utterances they speak, in file order."""
    utterances = draw_utterances(split, count, random.Random(f"{split}-{seed}"))
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = cache / "datasets" / f"spoken-digits-{split}-{count}-seed{seed}"
    if not folder.exists():
        write_utterances(folder, utterances)
    return folder, utterances


class SpokenDigitDataModule(L.LightningDataModule):
    """Spoken digits as log-mel features [MELS, FRAMES] with their digit, for training the audio
    encoder (stage 0). The test split (validation and test) speaks with held-out voices.

    Args:
        train_size: Utterances in the training split (the digits in equal shares).
        test_size: Utterances in the test split.
        seed: Seed of the utterances' accents, voices, speeds and pitches.
        batch_size: Training utterances per batch.
        eval_batch_size: Utterances per evaluation batch.
        cache_dir: Where the synthesised files live (see `lightning_moe.assets`).
    """

    def __init__(
        self,
        train_size: int = 2000,
        test_size: int = 500,
        seed: int = 0,
        batch_size: int = 32,
        eval_batch_size: int = 100,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.sizes = {"train": train_size, "test": test_size}
        self.seed = seed
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.cache_dir = cache_dir
        self.splits: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        for split, count in self.sizes.items():
            if split in self.splits:
                continue
            folder, utterances = spoken_digit_folder(split, count, self.seed, self.cache_dir)
            features = [wav_features(folder / f"{i:06d}.wav") for i in range(len(utterances))]
            self.splits[split] = TensorDataset(
                torch.from_numpy(np.stack(features)) if features else torch.empty(0, MELS, FRAMES),
                torch.tensor([u.digit for u in utterances], dtype=torch.long),
            )
        if stage in ("fit", None):
            require_training_examples(self.splits["train"], self)

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        data = self.splits[split]
        sampler = resumed_training_sampler(self, len(data), self.seed, batch_size) if shuffle else None
        return DataLoader(data, batch_size=batch_size, sampler=sampler, collate_fn=_feature_batch)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)


def _feature_batch(rows: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    features, digits = zip(*rows, strict=True)
    return {"features": torch.stack(features), "digit": torch.stack(digits)}

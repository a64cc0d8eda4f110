"""How several concept LoRAs, held as one fixed-weight LoRA mixture per adapted layer (`kind:
xlora` with `fixed_weights`), combine into one noise prediction at each denoising step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from lightning_moe.adapters import fixed_mixture_size, set_mixture_weights
from lightning_moe.errors import UserInputError

NoisePrediction = Callable[[], Tensor]


@dataclass
class Sampling:
    """What a composition may read while one batch of prompts is sampled.

    `states` and `mask` are the text encoder's output for the prompts, followed (with guidance)
    by the unconditional rows; `layouts` maps each prompt's concept words to a canvas region.
    """

    unet: nn.Module
    tokenizer: Any
    prompts: list[str]
    layouts: list[dict[str, str]] | None
    states: Tensor
    mask: Tensor
    scheduler: Any  # a diffusers scheduler, its timesteps set

    def conditional_noise(self, latents: Tensor, timestep: Tensor) -> Tensor:
        """The UNet's noise for the prompts alone (no unconditional rows), with gradients if enabled."""
        rows = len(self.prompts)
        return self.unet(
            self.scheduler.scale_model_input(latents, timestep),
            timestep,
            encoder_hidden_states=self.states[:rows],
            encoder_attention_mask=self.mask[:rows],
        ).sample


class Composition:
    """How the LoRAs of a fixed-weight mixture combine into one noise prediction at a step; this
    base samples the model as it is.

    The pipeline calls `start` before the first step (it may re-initialise the latents), `guide`
    before each step (it may move the latents), `predict` at each step, and `finish` at the end,
    also after an error.
    """

    def start(self, sampling: Sampling, latents: Tensor) -> Tensor:
        return latents

    def guide(self, latents: Tensor, step: int, timestep: Tensor) -> Tensor:
        return latents

    def predict(self, unet: nn.Module, predict_noise: NoisePrediction, step: int) -> Tensor:
        return predict_noise()

    def finish(self) -> None:
        return None


def one_hot(index: int, count: int) -> list[float]:
    return [1.0 if k == index else 0.0 for k in range(count)]


@dataclass
class Merge(Composition):
    """One network with the weighted sum of the LoRAs' updates (sum_k w_k B_k A_k); without
    weights every LoRA counts fully (w_k = 1), as when LoRAs are loaded together."""

    weights: list[float] | None = None

    def predict(self, unet: nn.Module, predict_noise: NoisePrediction, step: int) -> Tensor:
        set_mixture_weights(unet, self.weights or [1.0] * fixed_mixture_size(unet))
        return predict_noise()


@dataclass
class Switch(Composition):
    """One LoRA active at a time, the next one every `every` denoising steps, round robin."""

    every: int = 1

    def __post_init__(self) -> None:
        if self.every < 1:
            raise UserInputError(f"Switch(every) must be >= 1 denoising step, got every={self.every}")

    def predict(self, unet: nn.Module, predict_noise: NoisePrediction, step: int) -> Tensor:
        count = fixed_mixture_size(unet)
        set_mixture_weights(unet, one_hot(step // self.every % count, count))
        return predict_noise()


@dataclass
class Composite(Composition):
    """Every LoRA predicts the noise on its own; the predictions are averaged (before guidance)."""

    def predict(self, unet: nn.Module, predict_noise: NoisePrediction, step: int) -> Tensor:
        count = fixed_mixture_size(unet)
        total = None
        for index in range(count):
            set_mixture_weights(unet, one_hot(index, count))
            noise = predict_noise()
            total = noise if total is None else total + noise
        return total / count

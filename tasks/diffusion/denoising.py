"""What both diffusion tasks share: the text-conditioned UNet, the diffusion loss and sampling.

The loss is the usual one: noise (epsilon) or velocity prediction at a uniformly drawn
timestep, optionally min-SNR weighted; captions are dropped at `caption_dropout` so
classifier-free guidance has an unconditional model. Every validation logs a grid of samples for
`sample_prompts` to TensorBoard, each column under its prompt.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_moe.errors import UserInputError
from lightning_moe.tasks.diffusion.compositions import Composition
from lightning_moe.tasks.diffusion.models import TextToImageModel, build_text_encoder, build_unet
from lightning_moe.tasks.diffusion.pipeline import TextToImagePipeline, encode_text
from lightning_moe.tasks.diffusion.sample_grid import captioned_figure
from lightning_moe.tokenization import load_tokenizer


class TextToImageDiffusion:
    """Mixed into a TaskModule: the model (`build_model`), loss (`task_loss`) and sampling of a
    text-conditioned UNet.

    Args:
        unet_path: A trained UNet folder to start from (`save_pretrained`).
        unet_config: Instead: UNet2DConditionModel arguments for a new UNet;
            `cross_attention_dim` must be the text encoder's width (384 for MiniLM).
        text_encoder: Asset name, folder or hub id of the frozen text encoder.
        text_encoder_config: Instead: a config dict (with `model_type`) for a random tiny encoder.
        tokenizer: The text encoder's tokenizer ("bytes": the in-code byte tokenizer).
        prediction_type: "epsilon" (predict the noise) or "v_prediction" (the velocity).
        min_snr_gamma: Min-SNR loss weighting min(SNR, gamma) / SNR (or / (SNR + 1) for v);
            None weighs every timestep alike.
        num_train_timesteps: Steps of the training noise schedule.
        caption_dropout: Probability of training a sample on the empty caption.
        sample_prompts: Prompts whose samples are logged after every validation.
        num_inference_steps: Denoising steps of sampling (DDIM).
        guidance_scale: Classifier-free guidance of sampling.
        model_seed: Seed of a new UNet's initialisation and of the logged samples; prediction
            batch i starts from the noise of seed model_seed + i.
        cache_dir: Where packaged assets are cached.
        **kwargs: The settings of the task this is mixed into.
    """

    def __init__(
        self,
        unet_path: str | None = None,
        unet_config: dict[str, Any] | None = None,
        text_encoder: str | None = "all-minilm-l6-v2",
        text_encoder_config: dict[str, Any] | None = None,
        tokenizer: str = "all-minilm-l6-v2",
        prediction_type: Literal["epsilon", "v_prediction"] = "epsilon",
        min_snr_gamma: float | None = 5.0,
        num_train_timesteps: int = 1000,
        caption_dropout: float = 0.1,
        sample_prompts: list[str] | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 3.0,
        model_seed: int = 0,
        cache_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.unet_path = unet_path
        self.unet_config = unet_config
        self.text_encoder_name = None if text_encoder_config is not None else text_encoder
        self.text_encoder_config = text_encoder_config
        self.tokenizer = load_tokenizer(tokenizer, cache_dir)
        self.min_snr_gamma = min_snr_gamma
        self.caption_dropout = caption_dropout
        self.sample_prompts = list(sample_prompts or [])
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.model_seed = model_seed
        self.cache_dir = cache_dir
        self.caption_states: dict[str, Tensor] = {}
        self.evaluation_noise: torch.Generator | None = None
        self.noise_schedule = DDPMScheduler(
            num_train_timesteps=num_train_timesteps, prediction_type=prediction_type
        )

    # --- model --------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        unet = build_unet(self.unet_path, self.unet_config, self.model_seed)
        encoder = build_text_encoder(self.text_encoder_name, self.text_encoder_config, self.cache_dir)
        if unet.config.cross_attention_dim != encoder.config.hidden_size:
            raise UserInputError(
                f"the UNet's cross_attention_dim={unet.config.cross_attention_dim} must equal the text "
                f"encoder's width {encoder.config.hidden_size}"
            )
        return TextToImageModel(unet, encoder)

    def pipeline(self) -> TextToImagePipeline:
        scheduler = DDIMScheduler.from_config(self.noise_schedule.config)
        return TextToImagePipeline(self.model.unet, self.model.text_encoder, self.tokenizer, scheduler)

    # --- loss ---------------------------------------------------------------------------------
    def encode_captions(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Token states [B, T, width] and mask [B, T]. The encoder is frozen and the captions few
        (one per class and style), so each distinct caption is encoded once and cached."""
        missing = [caption for caption in dict.fromkeys(captions) if caption not in self.caption_states]
        if missing:
            states, mask = encode_text(self.tokenizer, self.model.text_encoder, missing, self.device)
            for row, caption in enumerate(missing):
                self.caption_states[caption] = states[row, : int(mask[row].sum())]
        rows = [self.caption_states[caption] for caption in captions]
        lengths = torch.tensor([len(row) for row in rows], device=self.device)
        mask = (torch.arange(int(lengths.max()), device=self.device) < lengths[:, None]).long()
        return nn.utils.rnn.pad_sequence(rows, batch_first=True), mask

    def task_loss(self, batch: dict) -> tuple[Tensor, Tensor | None]:
        images, captions = batch["image"], list(batch["caption"])
        generator = None if self.training else self.evaluation_noise
        if self.training and self.caption_dropout > 0:
            drop = torch.rand(len(captions)) < self.caption_dropout
            captions = [
                "" if dropped else caption for caption, dropped in zip(captions, drop.tolist(), strict=True)
            ]
        states, mask = self.encode_captions(captions)
        schedule = self.noise_schedule
        noise = torch.randn(images.shape, generator=generator, device=self.device)
        timesteps = torch.randint(
            0, schedule.config.num_train_timesteps, (len(images),), generator=generator, device=self.device
        )
        noisy = schedule.add_noise(images, noise, timesteps)
        if schedule.config.prediction_type == "epsilon":
            target = noise
        else:
            target = schedule.get_velocity(images, noise, timesteps)
        prediction = self.model.unet(
            noisy, timesteps, encoder_hidden_states=states, encoder_attention_mask=mask
        ).sample
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        return (per_sample * self.snr_weights(timesteps)).mean(), None

    def snr_weights(self, timesteps: Tensor) -> Tensor:
        """Min-SNR-gamma weights (Hang et al., 2023), or ones."""
        if self.min_snr_gamma is None:
            return torch.ones(len(timesteps), device=timesteps.device)
        alphas = self.noise_schedule.alphas_cumprod.to(timesteps.device)[timesteps]
        snr = alphas / (1 - alphas)
        clipped = snr.clamp(max=self.min_snr_gamma)
        if self.noise_schedule.config.prediction_type == "v_prediction":
            return clipped / (snr + 1)
        return clipped / snr

    # --- samples ------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        # every validation draws the same noise and timesteps, so its losses compare across epochs
        self.evaluation_noise = torch.Generator(self.device).manual_seed(self.model_seed)

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def on_validation_epoch_end(self) -> None:
        if not self.sample_prompts or not isinstance(self.logger, TensorBoardLogger):
            return
        images = self.sample(self.sample_prompts)
        figure = captioned_figure(images, self.sample_prompts, columns=len(self.sample_prompts))
        self.logger.experiment.add_figure("samples", figure, self.global_step)

    def sample(
        self,
        prompts: list[str],
        composition: Composition | None = None,
        seed: int = 0,
        layouts: list[dict[str, str]] | None = None,
    ) -> Tensor:
        generator = torch.Generator(self.device).manual_seed(self.model_seed + seed)
        return self.pipeline()(
            prompts,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            generator=generator,
            composition=composition,
            layouts=layouts,
        )

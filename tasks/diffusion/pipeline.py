"""Text-to-image sampling with a diffusers UNet2DConditionModel conditioned on a text encoder's token
states (pixel space, or latents of an AutoencoderKL).

The pipeline is a diffusers `DiffusionPipeline` with diffusers' Stable Diffusion LoRA loader, so
`pipeline.load_lora_weights(folder)` reads what `export_diffusers_lora` writes. Several concept
LoRAs are composed through the adapter core (see compositions.py): a `Composition` decides the
mixture weights at every denoising step.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn

from lightning_moe.errors import UserInputError
from lightning_moe.tasks.diffusion.compositions import Composition, Sampling


@torch.no_grad()
def encode_text(
    tokenizer, text_encoder: nn.Module, texts: list[str], device: torch.device
) -> tuple[Tensor, Tensor]:
    """Token states [B, T, width] and their attention mask [B, T] (texts padded together)."""
    tokens = tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(device)
    states = text_encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])[0]
    return states, tokens["attention_mask"]


class TextToImagePipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """Prompt -> image batch in [0, 1], with classifier-free guidance.

    Components: a UNet2DConditionModel whose `cross_attention_dim` is the text encoder's width,
    any transformers text encoder and its tokenizer, a diffusers scheduler, and optionally an
    AutoencoderKL (without one the UNet works on pixels in [-1, 1]).
    """

    def __init__(self, unet: UNet2DConditionModel, text_encoder: nn.Module, tokenizer, scheduler, vae=None):
        super().__init__()
        self.register_modules(
            unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, vae=vae
        )

    def encode_prompt(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        return encode_text(self.tokenizer, self.text_encoder, prompts, self.device)

    # outside inference mode (Lightning predicts inside it): its tensors cannot enter autograd,
    # and CLoRA and LoRA-Composer take gradient steps on the latent
    @torch.inference_mode(False)
    @torch.no_grad()
    def __call__(
        self,
        prompts: list[str],
        num_inference_steps: int = 25,
        guidance_scale: float = 3.0,
        generator: torch.Generator | None = None,
        composition: Composition | None = None,
        layouts: list[dict[str, str]] | None = None,
    ) -> Tensor:
        """`layouts` (each prompt's concept words -> canvas region) is for layout-aware compositions."""
        if num_inference_steps < 1:
            raise UserInputError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        guided = guidance_scale != 1.0
        unconditional_prompts = [""] * len(prompts) if guided else []
        states, mask = self.encode_prompt(list(prompts) + unconditional_prompts)
        size = self.unet.config.sample_size  # one side, or (height, width)
        height, width = (size, size) if isinstance(size, int) else size
        shape = (len(prompts), self.unet.config.in_channels, height, width)
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.unet.dtype)
        latents = latents * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        composition = composition or Composition()
        sampling = Sampling(self.unet, self.tokenizer, list(prompts), layouts, states, mask, self.scheduler)
        try:
            latents = composition.start(sampling, latents)
            for step, timestep in enumerate(self.scheduler.timesteps):
                latents = composition.guide(latents, step, timestep)
                model_input = self.scheduler.scale_model_input(torch.cat([latents] * (1 + guided)), timestep)

                def predict_noise(model_input=model_input, timestep=timestep) -> Tensor:
                    return self.unet(
                        model_input, timestep, encoder_hidden_states=states, encoder_attention_mask=mask
                    ).sample

                noise = composition.predict(self.unet, predict_noise, step)
                if guided:
                    conditional, unconditional = noise.chunk(2)
                    noise = unconditional + guidance_scale * (conditional - unconditional)
                latents = self.scheduler.step(noise, timestep, latents, generator=generator).prev_sample
        finally:
            composition.finish()
        return (self.decode(latents).clamp(-1, 1) + 1) / 2

    def decode(self, latents: Tensor) -> Tensor:
        if self.vae is None:
            return latents
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample

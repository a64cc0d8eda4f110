"""Text-to-image diffusion: train a small base UNet, or concept/style LoRAs on a trained one.

`TextToImageTask` holds a diffusers UNet2DConditionModel and a frozen text encoder (MiniLM by
default), both untouched model code. The base stage (`train_unet: true`, `adapters: []`) trains
the whole UNet and exports it with `save_pretrained`; the LoRA stage loads that UNet
(`unet_path`) and trains adapters on its attention projections, exported both in our format and
in the layout diffusers' `load_lora_weights` reads. The loss is the usual one: noise (epsilon)
or velocity prediction at a uniformly drawn timestep, optionally min-SNR weighted; captions are
dropped at `caption_dropout` so classifier-free guidance has an unconditional model. Every
validation logs a grid of samples for `sample_prompts` to TensorBoard.

`predict` samples the prompts of a `ConceptPromptDataModule` with several concept LoRAs composed
(`composition`: merge, switch or composite over a fixed-weight mixture; none for a trained gate)
and, given a concept judge, records per image whether each prompted concept shows.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.utils import make_grid
from transformers import AutoConfig, AutoModel

from lightning_moe.adapters import export_diffusers_lora
from lightning_moe.adapters.errors import UserInputError
from lightning_moe.assets import resolve_pretrained
from lightning_moe.module import AdapterModule
from lightning_moe.tasks.concept_judge import ConceptJudge, load_concept_judge
from lightning_moe.text_to_image import Composition, TextToImagePipeline, encode_text
from lightning_moe.tokenization import load_tokenizer

UNET_FOLDER = "unet"


class TextToImageModel(nn.Module):
    """The trainable part (UNet) and the conditioning (frozen text encoder), as one module."""

    def __init__(self, unet: UNet2DConditionModel, text_encoder: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> TextToImageModel:
        super().train(mode)
        self.text_encoder.eval()  # frozen conditioning: no dropout, so cached caption states hold
        return self


def build_unet(path: str | None, config: dict | None, seed: int) -> UNet2DConditionModel:
    """A trained UNet folder (`save_pretrained`), or a randomly initialised one from a config."""
    if (path is None) == (config is None):
        raise UserInputError("give exactly one of `unet_path` (a trained UNet folder) and `unet_config`")
    if path is not None:
        if not (Path(path) / "config.json").is_file():
            raise UserInputError(
                f"unet_path {path} holds no trained UNet (no config.json); train the base first, e.g. "
                "python -m lightning_moe fit --config configs/diffusion/base_fashion.yaml"
            )
        return UNet2DConditionModel.from_pretrained(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**config)


def build_text_encoder(name_or_path: str | None, config: dict | None, cache_dir: str | None) -> nn.Module:
    if config is not None:
        config = dict(config)
        return AutoModel.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
    return AutoModel.from_pretrained(resolve_pretrained(name_or_path, cache_dir))


class TextToImageTask(AdapterModule):
    """A text-conditioned UNet trained with the diffusion loss.

    Args:
        unet_path: A trained UNet folder to start from (the LoRA stage).
        unet_config: Instead: UNet2DConditionModel arguments for a new UNet (the base stage);
            `cross_attention_dim` must be the text encoder's width (384 for MiniLM).
        train_unet: Train every UNet weight (the base stage) instead of only adapters.
        text_encoder: Asset name, folder or hub id of the frozen text encoder.
        text_encoder_config: Instead: a config dict (with `model_type`) for a random tiny encoder.
        tokenizer: The text encoder's tokenizer ("bytes": the in-code byte tokenizer).
        prediction_type: "epsilon" (predict the noise) or "v_prediction" (the velocity).
        min_snr_gamma: Min-SNR loss weighting min(SNR, gamma) / SNR (or / (SNR + 1) for v);
            None weighs every timestep alike.
        num_train_timesteps: Steps of the training noise schedule.
        caption_dropout: Probability of training a sample on the empty caption.
        sample_prompts: Prompts whose samples are logged after every validation.
        num_inference_steps: Denoising steps of those samples (DDIM).
        guidance_scale: Classifier-free guidance of those samples.
        model_seed: Seed of a new UNet's initialisation and of the logged samples; prediction
            batch i starts from the noise of seed model_seed + i.
        composition: How `predict` combines the LoRAs of a fixed-weight mixture (`Merge`,
            `Switch`, `Composite` from lightning_moe.text_to_image); None samples the model as is.
        judge_path: A trained concept judge folder; `predict` then records concept presence.
        cache_dir: Where packaged assets are cached.
        **kwargs: Adapter and optimisation settings of `AdapterModule`.
    """

    def __init__(
        self,
        unet_path: str | None = None,
        unet_config: dict[str, Any] | None = None,
        train_unet: bool = False,
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
        composition: Composition | None = None,
        judge_path: str | None = None,
        cache_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if train_unet and self.adapter_rules:
            raise UserInputError("train_unet trains the whole UNet; give `adapters: []` with it")
        self.unet_path = unet_path
        self.unet_config = unet_config
        self.train_unet = train_unet
        self.text_encoder_name = None if text_encoder_config is not None else text_encoder
        self.text_encoder_config = text_encoder_config
        self.tokenizer = load_tokenizer(tokenizer, cache_dir)
        self.min_snr_gamma = min_snr_gamma
        self.caption_dropout = caption_dropout
        self.sample_prompts = list(sample_prompts or [])
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.model_seed = model_seed
        self.composition = composition
        self.judge_path = judge_path
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

    def extra_trainable_modules(self) -> dict[str, nn.Module]:
        return {"model.unet": self.model.unet} if self.train_unet and self.model is not None else {}

    def pipeline(self) -> TextToImagePipeline:
        scheduler = DDIMScheduler.from_config(self.noise_schedule.config)
        return TextToImagePipeline(self.model.unet, self.model.text_encoder, self.tokenizer, scheduler)

    def export_adapter(self, folder: str, base_model: str = "", overwrite: bool = False) -> None:
        if self.train_unet:
            if self.global_rank == 0:
                self.model.unet.save_pretrained(Path(folder) / UNET_FOLDER)
            return
        super().export_adapter(folder, base_model, overwrite)
        # diffusers loads plain LoRAs only; a gate over LoRAs stays in our format
        plain_lora = all(rule.adapter.kind == "lora" for rule in self.adapter_rules)
        if self.global_rank == 0 and plain_lora:
            export_diffusers_lora(self.model.unet, folder, overwrite=overwrite)

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
        grid = make_grid(images, nrow=len(self.sample_prompts), pad_value=0.5)
        self.logger.experiment.add_image("samples", grid, self.global_step)

    def sample(self, prompts: list[str], composition: Composition | None = None, seed: int = 0) -> Tensor:
        generator = torch.Generator(self.device).manual_seed(self.model_seed + seed)
        return self.pipeline()(
            prompts,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            generator=generator,
            composition=composition,
        )

    # --- composed concepts --------------------------------------------------------------------
    def on_predict_start(self) -> None:
        judge = load_concept_judge(self.judge_path).to(self.device) if self.judge_path else None
        if judge is not None:
            check_judge_knows(judge, getattr(self.trainer.datamodule, "prompts", None), self.judge_path)
        # kept out of the module tree: the judge is neither part of the model nor of its checkpoints
        self.__dict__["concept_judge"] = judge

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """One record per prompt: the image, its sampling cost and, with a judge, which concepts show."""
        start = time.perf_counter()
        images = self.sample(batch["prompt"], self.composition, seed=batch_idx)
        seconds = (time.perf_counter() - start) / len(images)
        records = [
            {"prompt": prompt, "image": image.cpu(), "seconds_per_image": seconds}
            for prompt, image in zip(batch["prompt"], images, strict=True)
        ]
        if self.concept_judge is not None:
            verdicts = self.concept_judge.judge(images * 2 - 1)
            for row, record in enumerate(records):
                record |= concept_presence(
                    self.concept_judge, verdicts, row, batch["object"][row], batch["styles"][row]
                )
        return records


def check_judge_knows(judge: ConceptJudge, prompts, path: str) -> None:
    """Every object and style the prompts name must be one the judge can see."""
    if prompts is None:
        raise UserInputError(
            "judging concepts needs prompts that say which concepts to expect: use "
            "lightning_moe.data.concept_prompts.ConceptPromptDataModule, or judge_path: null"
        )
    known = set(judge.object_names + judge.style_names)
    for item in prompts:
        unknown = [concept for concept in [item["object"], *item["styles"]] if concept not in known]
        if unknown:
            raise UserInputError(
                f"the concept judge in {path} cannot judge {unknown[0]!r}; it knows the objects "
                f"{judge.object_names} and the styles {judge.style_names}"
            )


def concept_presence(
    judge: ConceptJudge,
    verdicts: dict[str, Tensor],
    row: int,
    expected_object: str,
    expected_styles: list[str],
) -> dict[str, Any]:
    """What the judge saw on image `row`, and whether each prompted concept is there."""
    seen_object = judge.object_names[int(verdicts["object"][row])]
    seen_styles = [name for name in judge.style_names if verdicts[name][row]]
    found = {"object_present": seen_object == expected_object} | {
        f"{style}_present": style in seen_styles for style in expected_styles
    }
    unprompted = [style for style in seen_styles if style not in expected_styles]
    judged = {"judged_object": seen_object, "judged_styles": seen_styles}
    return judged | found | {"all_present": all(found.values()), "unprompted_style": bool(unprompted)}

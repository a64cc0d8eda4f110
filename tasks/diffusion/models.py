"""The model of the diffusion domain: a diffusers UNet2DConditionModel and a frozen transformers
text encoder (MiniLM by default), both untouched model code, held as one module."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch import nn
from transformers import AutoConfig, AutoModel

from lightning_moe.assets import resolve_pretrained
from lightning_moe.errors import UserInputError


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

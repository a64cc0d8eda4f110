"""CLIP models for continual learning: any open_clip model, or one composed from packaged towers.

`build_clip` gives a `ClipModel`: the open_clip model (untouched model code, so adapters are
injected into it), its tokenizer, and the image statistics it normalises with. Images come in
as RGB in [0, 1]; features come out L2-normalised.

- "open_clip:<model>/<pretrained tag>", e.g. "open_clip:ViT-B-16/openai" (hub access needed).
- "packaged": no CLIP ships in any package, so this composes one with open_clip's
  CustomTextCLIP from the packaged EfficientNet-Lite0 (timm, ImageNet weights) image tower and
  the MiniLM text tower (mean pooled), each followed by a new linear projection to `embed_dim`.
  The projections start random: the alignment stage (LiT: towers frozen, projections trained
  contrastively) makes it a CLIP; `clip_path` then loads the aligned weights.
- `clip_config`: open_clip arguments for a random model (the tiny CLIPs of the tests): a
  CLIP with open_clip's own BPE tokenizer (it ships with open_clip), or a CustomTextCLIP whose
  text tower is an HF model folder, with that folder's tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import open_clip
import torch
from open_clip.tokenizer import HFTokenizer
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_moe.adapters.files import read_safetensors, write_folder_files
from lightning_moe.assets import IMAGENET_MEAN, IMAGENET_STD, load_in_order, resolve_pretrained
from lightning_moe.errors import UserInputError

PACKAGED = "packaged"
CLIP_WEIGHTS = "clip.safetensors"


class ClipModel(nn.Module):
    """An open_clip model with its tokenizer and image normalisation."""

    def __init__(self, clip: nn.Module, tokenizer, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.register_buffer("mean", torch.tensor(mean)[:, None, None], persistent=False)
        self.register_buffer("std", torch.tensor(std)[:, None, None], persistent=False)

    def train(self, mode: bool = True) -> ClipModel:
        super().train(mode)
        for module in self.modules():  # pretrained towers keep their statistics; adapters train
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def normalize(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> the pixel statistics the image tower was trained with."""
        return (images - self.mean) / self.std

    def encode_images(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> unit-length features [B, embed_dim]."""
        return F.normalize(self.clip.encode_image(self.normalize(images)), dim=-1)

    def encode_texts(self, texts: list[str]) -> Tensor:
        tokens = self.tokenizer(texts).to(self.mean.device)
        return F.normalize(self.clip.encode_text(tokens), dim=-1)

    @property
    def logit_scale(self) -> Tensor:
        return self.clip.logit_scale.exp()


def packaged_clip(embed_dim: int, image_size: int, cache_dir: str | None) -> ClipModel:
    """EfficientNet-Lite0 + MiniLM as an open_clip CustomTextCLIP, both towers pretrained."""
    text_folder = resolve_pretrained("all-minilm-l6-v2", cache_dir)
    clip = open_clip.CustomTextCLIP(
        embed_dim=embed_dim,
        vision_cfg={
            "timm_model_name": "efficientnet_lite0",
            "timm_pool": "avg",
            "timm_proj": "linear",
            "image_size": image_size,
        },
        text_cfg={
            "hf_model_name": text_folder,
            "hf_tokenizer_name": text_folder,
            "hf_pooler_type": "mean_pooler",
            "hf_proj_type": "linear",
            "context_length": 64,
        },
    )
    load_in_order(clip.visual.trunk, resolve_pretrained("efficientnet-lite0", cache_dir))
    tokenizer = HFTokenizer(text_folder, context_length=64)
    return ClipModel(clip, tokenizer, IMAGENET_MEAN, IMAGENET_STD)


def clip_from_config(clip_config: dict) -> ClipModel:
    """A random CLIP from open_clip arguments: a CustomTextCLIP with its HF tokenizer when the
    text tower names an HF model folder (`text_cfg.hf_model_name`), else a CLIP with open_clip's
    BPE tokenizer."""
    text = clip_config.get("text_cfg", {})
    context = text.get("context_length", 77)
    if "hf_model_name" in text:
        clip = open_clip.CustomTextCLIP(**clip_config)
        return ClipModel(
            clip, HFTokenizer(text["hf_model_name"], context_length=context), IMAGENET_MEAN, IMAGENET_STD
        )
    clip = open_clip.CLIP(**clip_config)
    return ClipModel(clip, open_clip.SimpleTokenizer(context_length=context), IMAGENET_MEAN, IMAGENET_STD)


def build_clip(
    name: str | None = PACKAGED,
    clip_config: dict | None = None,
    clip_path: str | None = None,
    embed_dim: int = 256,
    image_size: int = 224,
    cache_dir: str | None = None,
) -> ClipModel:
    """The CLIP named by `name` (see the module docstring), or a random one from `clip_config`;
    `clip_path` then loads weights saved by `save_clip` (e.g. the aligned packaged CLIP)."""
    if clip_config is not None:
        model = clip_from_config(clip_config)
    elif name == PACKAGED:
        model = packaged_clip(embed_dim, image_size, cache_dir)
    elif name is not None and name.startswith("open_clip:"):
        model_name, _, tag = name.removeprefix("open_clip:").partition("/")
        clip = open_clip.create_model(model_name, pretrained=tag or None)
        mean = getattr(clip.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(clip.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        model = ClipModel(clip, open_clip.get_tokenizer(model_name), tuple(mean), tuple(std))
    else:
        raise UserInputError(
            f"clip must be 'packaged', 'open_clip:<model>/<pretrained tag>' or a clip_config, got {name!r}"
        )
    if clip_path is not None:
        load_clip_weights(model, clip_path)
    return model


def save_clip(model: ClipModel, folder: str | Path, overwrite: bool = False) -> Path:
    return write_folder_files(folder, {CLIP_WEIGHTS: model.clip.state_dict()}, {}, overwrite)


def load_clip_weights(model: ClipModel, folder: str | Path) -> None:
    path = Path(folder) / CLIP_WEIGHTS
    if not path.is_file():
        raise UserInputError(
            f"no CLIP weights in {folder} ({CLIP_WEIGHTS}); align the packaged CLIP first, e.g. "
            "python -m lightning_moe fit --config configs/continual/align_clip.yaml"
        )
    state = read_safetensors(path)
    missing, unexpected = model.clip.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserInputError(
            f"{path} does not fit this CLIP: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )


def class_head(model: ClipModel, class_names: list[str], templates: list[str]) -> Tensor:
    """Class weights [C, embed_dim]: each class's template prompts encoded, averaged, normalised
    (CLIP's prompt ensembling). Differentiable, for training an adapted text tower."""
    prompts = [template.format(name) for name in class_names for template in templates]
    features = model.encode_texts(prompts).view(len(class_names), len(templates), -1)
    return F.normalize(features.mean(dim=1), dim=-1)


@torch.no_grad()
def zero_shot_head(model: ClipModel, class_names: list[str], templates: list[str]) -> Tensor:
    """`class_head` without gradients: the zero-shot classifier of a CLIP."""
    return class_head(model, class_names, templates)


def text_tower_trains(model: ClipModel) -> bool:
    """Whether anything that `encode_texts` uses has trainable parameters (so class heads change
    with training and cannot be cached)."""
    return any(
        parameter.requires_grad
        for name, parameter in model.clip.named_parameters()
        if not name.startswith("visual.") and name != "logit_scale"
    )


class ImageFeatureCache:
    """Unit-length image features. With a frozen timm image trunk (the packaged CLIP's), the
    trunk's output is computed once per image key and reused, so later passes run only the
    head (and any adapters in it); other towers are encoded every time."""

    def __init__(self) -> None:
        self.trunk_features: dict = {}

    def __call__(self, model: ClipModel, images: Tensor, keys: list) -> Tensor:
        visual = model.clip.visual
        trunk = getattr(visual, "trunk", None)
        if trunk is None or any(parameter.requires_grad for parameter in trunk.parameters()):
            return model.encode_images(images)
        missing = [row for row, key in enumerate(keys) if key not in self.trunk_features]
        if missing:
            with torch.no_grad():
                features = trunk(model.normalize(images[missing]))
            for row, feature in zip(missing, features, strict=True):
                self.trunk_features[keys[row]] = feature
        return F.normalize(visual.head(torch.stack([self.trunk_features[key] for key in keys])), dim=-1)

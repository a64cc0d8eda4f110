"""A LLaVA-style vision-language model assembled from pretrained parts.

vision encoder (frozen; a timm model's last feature map, or a transformers / open_clip
vision transformer's tokens) -> projector (two linears with GELU)
-> causal LM. The prompt holds one image-token id per visual token (the data side expands the
`<image>` placeholder); their input embeddings are replaced by the projected image features,
which therefore enter as prefix embeddings inside the chat template. Nothing in the LM is
forked: it receives `inputs_embeds`.
"""

from __future__ import annotations

import timm
import torch
from torch import Tensor, nn

from lightning_moe.assets import IMAGENET_MEAN, IMAGENET_STD, load_in_order, resolve_pretrained
from lightning_moe.errors import UserInputError

PACKAGED_TIMM_WEIGHTS = {"efficientnet-lite0": "efficientnet_lite0"}


class VisionTokens(nn.Module):
    """Any supported encoder as images [B, 3, H, W] in [0, 1] -> visual tokens [B, N, num_features]:
    a feature map's cells (timm, convolutional transformers models) or a transformer's tokens.

    The pixels are normalised here with the statistics the encoder was trained with (ImageNet's
    for timm's EfficientNet, OpenAI's for CLIP towers), so the data side never needs to know them.
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_features: int,
        kind: str,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.num_features = num_features
        self.kind = kind
        self.register_buffer("mean", torch.tensor(mean)[:, None, None], persistent=False)
        self.register_buffer("std", torch.tensor(std)[:, None, None], persistent=False)

    def forward(self, pixel_values: Tensor) -> Tensor:
        pixel_values = (pixel_values - self.mean) / self.std
        if self.kind == "open_clip":
            return self.encoder(pixel_values)[1]  # (pooled, tokens) with output_tokens set
        features = self.encoder(pixel_values)
        if self.kind == "transformers":
            features = features.last_hidden_state
        return features.flatten(2).transpose(1, 2) if features.dim() == 4 else features


def build_vision_encoder(name: str, pretrained: bool = True, cache_dir: str | None = None) -> VisionTokens:
    """A frozen vision encoder in eval mode that returns visual tokens.

    - "efficientnet-lite0": timm's model with the packaged ImageNet weights;
    - any other timm name: timm's pretrained weights (hub access), or random with `pretrained=False`;
    - "hf:<folder or hub id>": a transformers vision model (ViT, CLIP vision, DINOv2, ConvNeXt, ...);
    - "open_clip:<model>[/<pretrained tag>]": an open_clip model's image tower (its patch tokens).
    """
    if name.startswith("hf:"):
        from transformers import AutoImageProcessor, AutoModel

        folder = resolve_pretrained(name.removeprefix("hf:"), cache_dir)
        encoder = AutoModel.from_pretrained(folder)
        config = encoder.config
        width = getattr(config, "hidden_size", None) or config.hidden_sizes[-1]
        try:  # the model's own image statistics, when it ships an image processor
            processor = AutoImageProcessor.from_pretrained(folder)
            mean, std = tuple(processor.image_mean), tuple(processor.image_std)
        except (OSError, ValueError, AttributeError):
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        tokens = VisionTokens(encoder, width, "transformers", mean, std)
    elif name.startswith("open_clip:"):
        import open_clip

        model_name, _, tag = name.removeprefix("open_clip:").partition("/")
        visual = open_clip.create_model(model_name, pretrained=(tag or None) if pretrained else None).visual
        if not hasattr(visual, "transformer"):
            raise UserInputError(
                f"vision encoder {name!r}: only open_clip ViT image towers give patch tokens"
            )
        visual.output_tokens = True
        mean = getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        tokens = VisionTokens(visual, visual.transformer.width, "open_clip", tuple(mean), tuple(std))
    else:
        timm_name = PACKAGED_TIMM_WEIGHTS.get(name, name)
        try:
            encoder = timm.create_model(
                timm_name,
                pretrained=pretrained and name not in PACKAGED_TIMM_WEIGHTS,
                num_classes=0,
                global_pool="",
            )
        except RuntimeError as error:  # timm's message for an unknown model name
            raise UserInputError(f"vision encoder {name!r}: {error}") from None
        if pretrained and name in PACKAGED_TIMM_WEIGHTS:
            load_in_order(encoder, resolve_pretrained(name, cache_dir))
        config = encoder.pretrained_cfg
        tokens = VisionTokens(
            encoder,
            encoder.num_features,
            "timm",
            tuple(config.get("mean", IMAGENET_MEAN)),
            tuple(config.get("std", IMAGENET_STD)),
        )
    return tokens.requires_grad_(False).eval()


class ImageProjector(nn.Sequential):
    """Visual features [.., C] to LM embeddings [.., d]: Linear, GELU, Linear (LLaVA-1.5's mlp2x_gelu)."""

    def __init__(self, vision_features: int, lm_width: int) -> None:
        super().__init__(nn.Linear(vision_features, lm_width), nn.GELU(), nn.Linear(lm_width, lm_width))


class VisionLanguageModel(nn.Module):
    """Encoder + projector + causal LM; `image_token_id` marks the visual-token slots of a prompt."""

    def __init__(self, vision: nn.Module, language_model: nn.Module, image_token_id: int) -> None:
        super().__init__()
        self.vision = vision
        self.language_model = language_model
        self.projector = ImageProjector(
            vision.num_features, language_model.get_input_embeddings().embedding_dim
        )
        self.image_token_id = image_token_id

    def image_embeddings(self, pixel_values: Tensor) -> Tensor:
        """[B, 3, H, W] -> [B, N, d]: one projected token per visual token."""
        with torch.no_grad():  # the encoder is frozen
            tokens = self.vision.eval()(pixel_values)
        return self.projector(tokens)

    def input_embeddings(self, input_ids: Tensor, pixel_values: Tensor | None) -> Tensor:
        """Token embeddings with the image-token slots filled, in order, by the images' tokens."""
        embeddings = self.language_model.get_input_embeddings()(input_ids)
        slots = input_ids == self.image_token_id
        if pixel_values is None or len(pixel_values) == 0:
            if slots.any():
                raise UserInputError("the prompt has image-token slots but the batch has no images")
            return embeddings
        images = self.image_embeddings(pixel_values)
        if int(slots.sum()) != images.shape[0] * images.shape[1]:
            raise UserInputError(
                f"the batch has {int(slots.sum())} image-token slots for {images.shape[0]} images of "
                f"{images.shape[1]} tokens each; expand each <image> to {images.shape[1]} slots"
            )
        return embeddings.masked_scatter(slots[..., None], images.to(embeddings.dtype))

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        pixel_values: Tensor | None = None,
        labels: Tensor | None = None,
    ):
        embeddings = self.input_embeddings(input_ids, pixel_values)
        return self.language_model(inputs_embeds=embeddings, attention_mask=attention_mask, labels=labels)

    @torch.no_grad()
    def generate(
        self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None, **kwargs
    ) -> Tensor:
        """New tokens only (the LM generates from `inputs_embeds`, so it returns no prompt ids)."""
        embeddings = self.input_embeddings(input_ids, pixel_values)
        return self.language_model.generate(inputs_embeds=embeddings, attention_mask=attention_mask, **kwargs)

"""A LLaVA-style vision-language model assembled from pretrained parts.

vision encoder (frozen; a timm model's last feature map, or a transformers / open_clip
vision transformer's tokens) -> projector (two linears with GELU)
-> causal LM; optionally an audio encoder (frozen, `audio_encoder`) -> its own projector, the
same way. The prompt holds one image-token id per visual token (the data side expands the
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


class Connector(nn.Sequential):
    """Encoder features [.., C] to LM embeddings [.., d]: Linear, GELU, Linear (LLaVA-1.5's
    mlp2x_gelu); the image projector, and the audio one."""

    def __init__(self, features: int, lm_width: int) -> None:
        super().__init__(nn.Linear(features, lm_width), nn.GELU(), nn.Linear(lm_width, lm_width))


class VisionLanguageModel(nn.Module):
    """Encoders + connectors + causal LM. `image_token_id` marks the visual-token slots of a
    prompt; with an audio encoder, `audio_token_id` marks its audio-token slots."""

    def __init__(
        self,
        vision: nn.Module,
        language_model: nn.Module,
        image_token_id: int,
        audio: nn.Module | None = None,
        audio_token_id: int | None = None,
    ) -> None:
        super().__init__()
        width = language_model.get_input_embeddings().embedding_dim
        self.vision = vision
        self.language_model = language_model
        self.projector = Connector(vision.num_features, width)
        self.image_token_id = image_token_id
        if (audio is None) != (audio_token_id is None):
            raise UserInputError("an audio encoder needs its audio_token, and an audio_token its encoder")
        self.audio = audio
        self.audio_projector = Connector(audio.num_features, width) if audio is not None else None
        self.audio_token_id = audio_token_id

    def image_embeddings(self, pixel_values: Tensor) -> Tensor:
        """[B, 3, H, W] -> [B, N, d]: one projected token per visual token."""
        with torch.no_grad():  # the encoder is frozen
            tokens = self.vision.eval()(pixel_values)
        return self.projector(tokens)

    def audio_embeddings(self, audio_features: Tensor) -> Tensor:
        """Log-mel features [B, mels, frames] -> [B, N, d]: one projected token per audio token."""
        with torch.no_grad():  # the encoder is frozen
            tokens = self.audio.eval()(audio_features)
        return self.audio_projector(tokens)

    def input_embeddings(
        self, input_ids: Tensor, pixel_values: Tensor | None, audio_features: Tensor | None = None
    ) -> Tensor:
        """Token embeddings with the image-token (and audio-token) slots filled, in order, by the
        images' (and audio files') tokens."""
        embeddings = self.language_model.get_input_embeddings()(input_ids)
        embeddings = _fill_slots(
            embeddings, input_ids == self.image_token_id, pixel_values, self.image_embeddings, "image"
        )
        if self.audio is None:
            if audio_features is not None and len(audio_features):
                raise UserInputError(
                    "the batch has audio, but the model has no audio encoder; set audio_encoder"
                )
            return embeddings
        return _fill_slots(
            embeddings, input_ids == self.audio_token_id, audio_features, self.audio_embeddings, "audio"
        )

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        pixel_values: Tensor | None = None,
        labels: Tensor | None = None,
        audio_features: Tensor | None = None,
    ):
        embeddings = self.input_embeddings(input_ids, pixel_values, audio_features)
        return self.language_model(inputs_embeds=embeddings, attention_mask=attention_mask, labels=labels)

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        pixel_values: Tensor | None,
        audio_features: Tensor | None = None,
        **kwargs,
    ) -> Tensor:
        """New tokens only (the LM generates from `inputs_embeds`, so it returns no prompt ids)."""
        embeddings = self.input_embeddings(input_ids, pixel_values, audio_features)
        return self.language_model.generate(inputs_embeds=embeddings, attention_mask=attention_mask, **kwargs)


def _fill_slots(embeddings: Tensor, slots: Tensor, inputs: Tensor | None, embed, what: str) -> Tensor:
    """`embeddings` with its `slots` replaced, in order, by the tokens `embed(inputs)` gives."""
    if inputs is None or len(inputs) == 0:
        if slots.any():
            raise UserInputError(f"the prompt has {what}-token slots but the batch has no {what}s")
        return embeddings
    tokens = embed(inputs)
    if int(slots.sum()) != tokens.shape[0] * tokens.shape[1]:
        raise UserInputError(
            f"the batch has {int(slots.sum())} {what}-token slots for {tokens.shape[0]} {what}s of "
            f"{tokens.shape[1]} tokens each; expand each <{what}> to {tokens.shape[1]} slots"
        )
    return embeddings.masked_scatter(slots[..., None], tokens.to(embeddings.dtype))

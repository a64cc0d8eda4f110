"""Attention that layout-aware compositions can read and steer, on any UNet2DConditionModel.

`ConceptAttnProcessor` is a diffusers attention processor that computes attention explicitly
(through the `Attention` module's own projections, head split and scores, so LoRA-adapted
projections take part) instead of a fused kernel, so that it can
- record each cross-attention layer's per-token maps (the probability every query pixel gives
  each text token), averaged over heads, and
- add biases before the softmax: a token may be attendable only from its region (injection), and
  a query pixel of one region may not attend to another region's pixels (isolation).

One `AttentionControl` says what every processor of the UNet does on the next pass;
`install_processors(unet, control)` puts them in and returns the UNet's own, to restore after.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from diffusers.models.attention_processor import Attention
from torch import Tensor, nn
from torch.nn import functional as F

BLOCKED = -1e4  # the bias of a forbidden (query, key) pair; finite, so a fully blocked row stays finite


@dataclass
class AttentionControl:
    """What the ConceptAttnProcessors of a UNet do on a pass over latents of `height` x `width`.

    Attributes:
        height, width: The latent's size; a layer's query grid is this scaled to its length.
        record: Whether cross-attention layers append their token maps to `maps`.
        token_regions: Injection: [rows, tokens, height, width], 1 where a token may be attended
            from; it applies to the first `rows` rows of a pass (the prompts with guidance's
            unconditional rows after them) while `constrain` is set.
        slot_labels: Isolation: [rows, height, width] ints; a query pixel labelled i > 0 may not
            attend to a pixel labelled j > 0, j != i (self-attention; rows repeat over the batch).
        constrain: Whether the biases above apply on this pass.
        maps: Recorded maps, one [rows, tokens, h, w] per cross-attention layer.
    """

    height: int
    width: int
    record: bool = False
    token_regions: Tensor | None = None
    slot_labels: Tensor | None = None
    constrain: bool = True
    maps: list[Tensor] = field(default_factory=list)

    def grid(self, queries: int) -> tuple[int, int]:
        """The (h, w) grid of a layer with `queries` pixels, at the latent's aspect."""
        scale = math.sqrt(queries / (self.height * self.width))
        height, width = round(self.height * scale), round(self.width * scale)
        if height * width != queries:
            raise ValueError(f"{queries} attention queries do not tile a {self.height}x{self.width} latent")
        return height, width

    def cross_bias(self, rows: int, queries: int, keys: int) -> Tensor | None:
        """[rows, queries, keys] of 0 or BLOCKED: the injection constraint of one layer."""
        if not self.constrain or self.token_regions is None:
            return None
        allowed = F.interpolate(self.token_regions, size=self.grid(queries), mode="area") > 0
        allowed = allowed.flatten(2).transpose(1, 2)  # [prompts, queries, tokens]
        bias = torch.zeros(rows, queries, keys, device=allowed.device)
        prompts, _, tokens = allowed.shape
        bias[:prompts, :, :tokens] = (~allowed).float() * BLOCKED
        return bias

    def self_bias(self, rows: int, queries: int) -> Tensor | None:
        """[rows, queries, queries] of 0 or BLOCKED: the isolation constraint of one layer."""
        if not self.constrain or self.slot_labels is None:
            return None
        size = self.grid(queries)
        labels = F.interpolate(self.slot_labels[:, None].float(), size=size, mode="nearest").flatten(1)
        labels = labels.repeat(rows // len(labels), 1)
        query, key = labels[:, :, None], labels[:, None, :]
        return ((query > 0) & (key > 0) & (query != key)).float() * BLOCKED

    def token_maps(self) -> Tensor:
        """The recorded maps, each resized to the latent's grid, averaged over layers:
        [rows, tokens, height, width]."""
        if not self.maps:
            raise RuntimeError("no cross-attention maps were recorded on this pass")
        resized = [
            F.interpolate(layer, size=(self.height, self.width), mode="bilinear", align_corners=False)
            for layer in self.maps
        ]
        return torch.stack(resized).mean(0)


class ConceptAttnProcessor:
    """Explicit attention with the biases and recording of an AttentionControl."""

    def __init__(self, control: AttentionControl) -> None:
        self.control = control

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        **kwargs,
    ) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch, queries, _ = hidden_states.shape
        cross = encoder_hidden_states is not None
        keys = encoder_hidden_states.shape[1] if cross else queries
        attention_mask = attn.prepare_attention_mask(attention_mask, keys, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        context = hidden_states if not cross else encoder_hidden_states
        if cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        query, key, value = (attn.head_to_batch_dim(part) for part in (query, key, value))

        bias = (
            self.control.cross_bias(batch, queries, keys) if cross else self.control.self_bias(batch, queries)
        )
        if bias is not None:
            bias = bias.to(query.dtype).repeat_interleave(attn.heads, dim=0)
            attention_mask = bias if attention_mask is None else attention_mask + bias
        probabilities = attn.get_attention_scores(query, key, attention_mask)
        if cross and self.control.record:
            per_head = probabilities.view(batch, attn.heads, queries, keys).mean(1)
            grid = self.control.grid(queries)
            self.control.maps.append(per_head.transpose(1, 2).reshape(batch, keys, *grid))

        hidden_states = attn.batch_to_head_dim(torch.bmm(probabilities, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install_processors(unet: nn.Module, control: AttentionControl) -> dict:
    """Every attention layer of `unet` runs a ConceptAttnProcessor of `control`; returns the
    processors it had (`unet.set_attn_processor(returned)` restores them)."""
    own = unet.attn_processors
    unet.set_attn_processor(ConceptAttnProcessor(control))
    return own

"""nn.MultiheadAttention with its projections as real nn.Linear layers, so adapters attach there.

torch's MultiheadAttention (open_clip's towers use it) packs the q, k and v projections into one
parameter, `in_proj_weight` [3d, d], and `F.multi_head_attention_forward` reads that parameter
directly: an adapter wrapped around a linear inside it would be silently skipped.
`LinearMultiheadAttention` holds the very same parameters as `in_proj` (a Linear d -> 3d, the
fused projection) and `out_proj`, and computes the same attention through
`F.scaled_dot_product_attention`, so `inject` can target "attn.in_proj" and "attn.out_proj".
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .errors import AdapterConfigError


class LinearMultiheadAttention(nn.Module):
    """Drop-in for an nn.MultiheadAttention (same call signature and results), sharing its
    parameters. Supports self- and cross-attention with equal embedding sizes, bool or additive
    masks, key padding masks, attention dropout, and `need_weights`."""

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        if not attention._qkv_same_embed_dim or attention.bias_k is not None or attention.add_zero_attn:
            raise AdapterConfigError(
                "adapters attach to nn.MultiheadAttention only with one packed in-projection (kdim = vdim = "
                "embed_dim) and without bias_k/bias_v or add_zero_attn"
            )
        width = attention.embed_dim
        self.in_proj = nn.Linear(width, 3 * width, bias=attention.in_proj_bias is not None)
        self.in_proj.weight = attention.in_proj_weight
        self.in_proj.bias = attention.in_proj_bias
        self.out_proj = attention.out_proj
        self.num_heads = attention.num_heads
        self.dropout = attention.dropout
        self.batch_first = attention.batch_first

    def project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if query is key and key is value:  # self-attention: one pass through the fused projection
            return self.in_proj(query).chunk(3, dim=-1)
        # cross-attention: each input through the fused projection (adapter included), its third kept
        return tuple(self.in_proj(x).chunk(3, dim=-1)[part] for part, x in enumerate((query, key, value)))

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if not self.batch_first:
            query, key, value = (x.transpose(0, 1) if x.dim() == 3 else x for x in (query, key, value))
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query[None], key[None], value[None]
            key_padding_mask = None if key_padding_mask is None else key_padding_mask[None]
        q, k, v = (self.split_heads(x) for x in self.project(query, key, value))
        mask = self.additive_mask(attn_mask, key_padding_mask, q)
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                scores = scores + self.causal_mask(q, k)
            weights = F.dropout(scores.softmax(-1), dropout)
            heads = weights @ v
        else:
            causal = is_causal and mask is None
            heads = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal
            )
            weights = None
        batch, _, length, _ = heads.shape
        out = self.out_proj(heads.transpose(1, 2).reshape(batch, length, -1))
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if unbatched:
            out = out[0]
            weights = None if weights is None else weights[0]
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def split_heads(self, x: Tensor) -> Tensor:
        """[N, L, d] -> [N, heads, L, d / heads]."""
        batch, length, width = x.shape
        return x.view(batch, length, self.num_heads, width // self.num_heads).transpose(1, 2)

    def additive_mask(
        self, attn_mask: Tensor | None, key_padding_mask: Tensor | None, q: Tensor
    ) -> Tensor | None:
        """nn.MultiheadAttention's masks (bool: True = blocked; float: added) as one additive mask
        broadcastable to [N, heads, L, S]."""
        mask = None
        if attn_mask is not None:
            mask = self.as_additive(attn_mask, q.dtype)
            if mask.dim() == 3:  # [N * heads, L, S]
                mask = mask.view(-1, self.num_heads, *mask.shape[-2:])
        if key_padding_mask is not None:
            padding = self.as_additive(key_padding_mask, q.dtype)[:, None, None, :]
            mask = padding if mask is None else mask + padding
        return mask

    @staticmethod
    def as_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    @staticmethod
    def causal_mask(q: Tensor, k: Tensor) -> Tensor:
        blocked = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).triu(1)
        return LinearMultiheadAttention.as_additive(blocked, q.dtype)


def unfuse_attention(model: nn.Module, names: list[str]) -> dict[str, nn.MultiheadAttention]:
    """Replace the nn.MultiheadAttention modules `names` by `LinearMultiheadAttention` (in place);
    returns the originals, so that `restore_attention` can undo it."""
    originals = {name: model.get_submodule(name) for name in names}
    replacements = {name: LinearMultiheadAttention(attention) for name, attention in originals.items()}
    for name, replacement in replacements.items():  # only once every one could be built
        parent_name, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attribute, replacement)
    return originals


def restore_attention(model: nn.Module, originals: dict[str, nn.MultiheadAttention]) -> None:
    """Put back the modules `unfuse_attention` replaced."""
    for name, attention in originals.items():
        parent_name, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attribute, attention)

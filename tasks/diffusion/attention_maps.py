"""What layout-aware compositions compute from cross-attention maps (recorded by attention.py).

- `concept_token_indices`: which text tokens spell a concept's words in a prompt.
- `contrastive_map_loss` (CLoRA, Meral et al., 2024): an InfoNCE over concept maps. The maps of
  one concept in different views (the base pass, its LoRA's pass) are positives; every other
  concept's maps are negatives. Its gradient moves the latent so that concepts attend apart.
- `box_concentration_loss` (layout guidance, as in LoRA-Composer): per concept,
  (1 - the share of its attention inside its region)^2.
- `masks_from_maps` and `fuse_noise`: binary masks from min-max-normalised maps, and the noise
  prediction that takes each LoRA's where its mask is (their mean where masks overlap or none is).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from lightning_moe.errors import UserInputError


def concept_token_indices(tokenizer, prompt: str, words: str) -> list[int]:
    """Positions (in the tokenized prompt, special tokens included) of the tokens that overlap
    the first occurrence of `words` in `prompt`."""
    start = prompt.find(words)
    if start < 0:
        raise UserInputError(f"the concept {words!r} is not in the prompt {prompt!r}")
    end = start + len(words)
    offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
    return [
        index for index, (first, last) in enumerate(offsets) if last > first and first < end and last > start
    ]


def contrastive_map_loss(maps: Tensor, temperature: float = 0.5) -> Tensor:
    """maps [rows, views, concepts, H, W] -> the mean InfoNCE over every (view, concept) map, with
    cosine similarity over pixels at `temperature`. Zero when there is one concept (no negatives)."""
    rows, views, concepts = maps.shape[:3]
    count = views * concepts
    features = F.normalize(maps.flatten(3).float(), dim=-1).reshape(rows, count, -1)
    similarity = features @ features.transpose(1, 2) / temperature
    concept = torch.arange(concepts, device=maps.device).repeat(views)
    itself = torch.eye(count, dtype=torch.bool, device=maps.device)
    positive = (concept[:, None] == concept[None]) & ~itself
    log_probability = similarity.masked_fill(itself, float("-inf")).log_softmax(-1)
    per_anchor = -(log_probability.masked_fill(~positive, 0).sum(-1)) / positive.sum(-1).clamp(min=1)
    return per_anchor.mean()


def box_concentration_loss(maps: Tensor, regions: Tensor) -> Tensor:
    """maps, regions [rows, concepts, H, W] -> mean over concepts of (1 - inside / total)^2."""
    inside = (maps * regions).flatten(2).sum(-1) / maps.flatten(2).sum(-1).clamp(min=1e-12)
    return ((1 - inside) ** 2).mean()


def masks_from_maps(maps: Tensor, threshold: float = 0.5) -> Tensor:
    """maps [rows, concepts, H, W] -> 0/1 masks where the min-max-normalised map exceeds threshold."""
    flat = maps.flatten(2)
    low, high = flat.min(-1, keepdim=True).values, flat.max(-1, keepdim=True).values
    normalised = (flat - low) / (high - low).clamp(min=1e-12)
    return (normalised > threshold).to(maps.dtype).view_as(maps)


def fuse_noise(noises: list[Tensor], masks: Tensor) -> Tensor:
    """Each LoRA's noise [B, C, H, W] where its mask [B, K, H, W] is on: weight M_k / sum M where
    some mask is on, 1/K where none is. One LoRA gives its own noise. B may be a multiple of the
    mask rows (guidance's unconditional rows reuse the masks of their prompts)."""
    count = len(noises)
    masks = masks.repeat(noises[0].shape[0] // masks.shape[0], 1, 1, 1).to(noises[0].dtype)
    total = masks.sum(1, keepdim=True)
    weights = torch.where(total > 0, masks / total.clamp(min=1), torch.full_like(masks, 1 / count))
    return sum(weights[:, k : k + 1] * noise for k, noise in enumerate(noises))

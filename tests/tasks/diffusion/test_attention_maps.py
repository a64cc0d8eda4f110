"""The attention-map losses and masks of CLoRA and LoRA-Composer, on hand-built maps whose
right answers are known in closed form."""

import math

import pytest
import torch

from lightning_moe.errors import UserInputError
from lightning_moe.tasks.diffusion.attention_maps import (
    box_concentration_loss,
    concept_token_indices,
    contrastive_map_loss,
    fuse_noise,
    masks_from_maps,
)
from lightning_moe.tokenization import byte_tokenizer


def halves(height: int = 2, width: int = 4) -> torch.Tensor:
    """[2, H, W]: the left half, then the right half."""
    left = torch.zeros(height, width)
    left[:, : width // 2] = 1
    return torch.stack([left, 1 - left])


def test_concept_tokens_are_the_tokens_of_its_words():
    tokenizer = byte_tokenizer()
    prompt = "a bag on the left, framed"
    ids = tokenizer(prompt)["input_ids"]
    indices = concept_token_indices(tokenizer, prompt, "bag")
    assert tokenizer.decode([ids[i] for i in indices]) == "bag"
    framed = concept_token_indices(tokenizer, prompt, "framed")
    assert tokenizer.decode([ids[i] for i in framed]) == "framed"
    with pytest.raises(UserInputError, match="'sandal' is not in the prompt"):
        concept_token_indices(tokenizer, prompt, "sandal")


@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_contrastive_loss_of_apart_concepts_is_the_closed_form(temperature):
    # two views (base, LoRA) agree on each concept's map; the two concepts do not overlap: each
    # anchor has one positive at similarity 1 and two negatives at 0
    maps = halves().expand(1, 2, 2, 2, 4)
    expected = math.log(1 + 2 * math.exp(-1 / temperature))
    assert contrastive_map_loss(maps, temperature).item() == pytest.approx(expected, rel=1e-6)


def test_contrastive_loss_grows_as_concepts_overlap_and_pushes_them_apart():
    apart = halves().expand(1, 2, 2, 2, 4)
    overlapping = torch.ones(1, 2, 2, 2, 4)
    assert contrastive_map_loss(overlapping) > contrastive_map_loss(apart)
    # a gradient step on a mixed map moves each concept towards its own half
    mixed = (0.5 * halves() + 0.5 * halves().flip(0)[None]).squeeze(0) + 0.1 * halves()
    mixed = mixed.expand(1, 2, 2, 2, 4).clone().requires_grad_(True)
    contrastive_map_loss(mixed).backward()
    own = halves().bool().expand(1, 2, 2, 2, 4)
    assert (mixed.grad[own] < 0).all() and (mixed.grad[~own] > 0).all()


def test_contrastive_loss_of_one_concept_is_zero():
    assert contrastive_map_loss(torch.rand(3, 2, 1, 2, 4)).item() == pytest.approx(0.0, abs=1e-7)


def test_box_concentration_loss_is_the_share_outside_squared():
    regions = halves()[None]  # concept 0 left, concept 1 right
    inside = halves()[None]
    assert box_concentration_loss(inside, regions).item() == 0.0
    uniform = torch.ones(1, 2, 2, 4)  # half of each concept's mass is outside its box
    assert box_concentration_loss(uniform, regions).item() == pytest.approx(0.25)
    swapped = halves().flip(0)[None]
    assert box_concentration_loss(swapped, regions).item() == pytest.approx(1.0)


def test_masks_threshold_the_min_max_normalised_map():
    ramp = torch.arange(8.0).view(1, 1, 2, 4) * 3 + 5  # scale and offset do not matter
    mask = masks_from_maps(ramp, threshold=0.5)
    assert mask.flatten().tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert masks_from_maps(torch.full((1, 1, 2, 4), 2.0)).sum() == 0  # a flat map marks nothing


def test_fusion_takes_each_loras_noise_in_its_mask_and_the_mean_elsewhere():
    first, second = torch.full((2, 1, 2, 4), 1.0), torch.full((2, 1, 2, 4), 3.0)
    masks = torch.zeros(1, 2, 2, 4)
    masks[0, 0, :, 0] = 1  # column 0: the first LoRA
    masks[0, 1, :, 1] = 1  # column 1: the second
    masks[0, :, :, 2] = 1  # column 2: both -> their mean; column 3: none -> their mean
    fused = fuse_noise([first, second], masks)  # rows 2 (guidance's unconditional) reuse the masks
    assert fused[:, 0, 0].tolist() == [[1.0, 3.0, 2.0, 2.0]] * 2
    assert torch.equal(fuse_noise([first], masks[:, :1]), first)  # one LoRA: its noise alone

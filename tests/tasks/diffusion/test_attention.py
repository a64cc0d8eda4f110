"""The explicit attention processor of the layout-aware compositions: the same maths as diffusers'
own processor, maps that are attention probabilities, and constraints that cut exactly the
(query, key) pairs they name. Float64 throughout, so the comparisons hold on any CPU kernels."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor

from lightning_moe.tasks.diffusion.attention import (
    AttentionControl,
    ConceptAttnProcessor,
    install_processors,
)
from tests.tiny import TINY_CANVAS_UNET
from tests.tolerances import assert_same_maths

HEIGHT, WIDTH = 4, 8  # a two-slot latent: the left half and the right half


def canvas_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY_CANVAS_UNET).double()


def unet_inputs(batch: int = 2, tokens: int = 5):
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(batch, 1, HEIGHT, WIDTH, generator=generator, dtype=torch.float64)
    states = torch.randn(batch, tokens, 16, generator=generator, dtype=torch.float64)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[1, -1] = 0  # the second prompt is one token shorter (padding)
    return latents, states, mask


def noise(unet, latents, states, mask):
    return unet(latents, 10, encoder_hidden_states=states, encoder_attention_mask=mask).sample


def halves(rows: int) -> torch.Tensor:
    labels = torch.ones(rows, HEIGHT, WIDTH, dtype=torch.long)
    labels[..., WIDTH // 2 :] = 2
    return labels


def test_unconstrained_processor_is_diffusers_attention_and_is_undone():
    unet = canvas_unet()
    inputs = unet_inputs()
    unet.set_attn_processor(AttnProcessor())
    reference = noise(unet, *inputs)
    own = install_processors(unet, AttentionControl(HEIGHT, WIDTH))
    assert all(isinstance(p, ConceptAttnProcessor) for p in unet.attn_processors.values())
    assert_same_maths(noise(unet, *inputs), reference)
    unet.set_attn_processor(own)
    assert all(isinstance(p, AttnProcessor) for p in unet.attn_processors.values())


def test_recorded_maps_are_probabilities_over_the_real_tokens():
    unet = canvas_unet()
    control = AttentionControl(HEIGHT, WIDTH, record=True)
    install_processors(unet, control)
    latents, states, mask = unet_inputs()
    noise(unet, latents, states, mask)
    # attn2 of all 7 transformer blocks, and attn1 of the 3 in the cross-attention-only level
    assert len(control.maps) == 10
    assert {tuple(layer.shape[-2:]) for layer in control.maps} == {(4, 8), (2, 4)}
    for layer in control.maps:
        assert_same_maths(layer.sum(1), torch.ones_like(layer.sum(1)))
    # attn2 applies the text mask, so prompt 2's padding token is (almost) never attended there;
    # diffusers gives attn1 of a cross-attention-only block no text mask, so there it is
    masked = [layer[1, -1].max() < 1e-3 for layer in control.maps]
    assert sum(masked) == 7
    maps = control.token_maps()
    assert maps.shape == (2, 5, HEIGHT, WIDTH)


def test_injection_keeps_a_token_out_of_every_pixel_outside_its_region():
    unet = canvas_unet()
    regions = torch.ones(1, 5, HEIGHT, WIDTH, dtype=torch.float64)
    regions[0, 2, :, WIDTH // 2 :] = 0  # token 2 of the first prompt: the left half only
    control = AttentionControl(HEIGHT, WIDTH, record=True, token_regions=regions)
    install_processors(unet, control)
    latents, states, mask = unet_inputs()
    noise(unet, latents, states, mask)
    for layer in control.maps:
        right = layer.shape[-1] // 2
        assert layer[0, 2, :, right:].max() < 1e-3  # blocked (bias -1e4: exp underflows)
        assert layer[0, 2, :, :right].min() > 1e-3
        assert layer[1, 2, :, right:].min() > 1e-3  # rows past the constrained prompts are free
    control.maps.clear()
    control.constrain = False
    noise(unet, latents, states, mask)
    assert min(layer[0, 2, :, layer.shape[-1] // 2 :].min() for layer in control.maps) > 1e-3


@pytest.mark.parametrize("cross", [False, True])
def test_constrained_attention_equals_attention_over_the_allowed_keys(cross):
    """On one Attention layer: a left-half query under isolation (self) or a token allowed only
    on the left (cross) sees exactly what attention over the keys it may see gives."""
    torch.manual_seed(0)
    attn = Attention(8, cross_attention_dim=6 if cross else None, heads=2, dim_head=4).double()
    hidden = torch.randn(1, HEIGHT * WIDTH, 8, dtype=torch.float64)
    context = torch.randn(1, 3, 6, dtype=torch.float64) if cross else None
    if cross:
        regions = torch.ones(1, 3, HEIGHT, WIDTH, dtype=torch.float64)
        regions[0, 0, :, WIDTH // 2 :] = 0
        control = AttentionControl(HEIGHT, WIDTH, token_regions=regions)
    else:
        control = AttentionControl(HEIGHT, WIDTH, slot_labels=halves(1))
    attn.set_processor(ConceptAttnProcessor(control))
    constrained = attn(hidden, encoder_hidden_states=context)

    attn.set_processor(AttnProcessor())
    left = (torch.arange(HEIGHT * WIDTH) % WIDTH) < WIDTH // 2
    if cross:
        # right-half queries may not attend token 0: attention over tokens 1 and 2 alone
        expected_right = attn(hidden, encoder_hidden_states=context[:, 1:])[:, ~left]
        expected_left = attn(hidden, encoder_hidden_states=context)[:, left]
    else:
        # a query attends only to keys of its own half: attention within that half
        expected_left = attn(hidden[:, left])
        expected_right = attn(hidden[:, ~left])
    assert_same_maths(constrained[:, left], expected_left)
    assert_same_maths(constrained[:, ~left], expected_right)


def test_the_bias_of_each_constraint_on_hand_built_labels():
    labels = torch.tensor([[[1, 1, 0, 2, 2, 2, 0, 0]] * 4])  # [1, 4, 8]
    control = AttentionControl(HEIGHT, WIDTH, slot_labels=labels)
    bias = control.self_bias(rows=2, queries=32)
    flat = labels.flatten()
    blocked = (flat[:, None] > 0) & (flat[None] > 0) & (flat[:, None] != flat[None])
    assert torch.equal(bias[0] < 0, blocked) and torch.equal(bias[1] < 0, blocked)
    # at half the resolution the labels are taken nearest: columns 0, 2, 4, 6 -> 1, 0, 2, 0
    low = control.self_bias(rows=1, queries=8)[0] < 0
    assert low[0, 2] and low[2, 0] and not low[0, 1] and not low[0, 0]
    control.constrain = False
    assert control.self_bias(rows=2, queries=32) is None
    with pytest.raises(ValueError, match="do not tile"):
        control.grid(10)

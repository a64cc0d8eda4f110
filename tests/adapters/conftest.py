"""Tiny models built from configs (random weights, CPU, offline) for the adapter-core tests.

The fixtures return builder functions, so one test can build the same base twice (same seed ->
identical weights) or a different base (another seed or width).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn

VOCAB_SIZE = 64


def build_llama(seed: int = 0, hidden_size: int = 32, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A 2-layer Llama (GQA attention, SwiGLU MLP) with random weights, in eval mode; the weights
    are drawn in fp32 whatever `dtype`, so a float64 model holds the same values."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype).eval()


def build_clip(seed: int = 0) -> nn.Module:
    """An open_clip CLIP with a 1-layer ViT (16px images, 8px patches) and a 1-layer text tower."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg={
            "image_size": 16,
            "patch_size": 8,
            "width": 32,
            "layers": 1,
            "head_width": 16,
            "mlp_ratio": 2.0,
        },
        text_cfg={
            "context_length": 8,
            "vocab_size": VOCAB_SIZE,
            "width": 32,
            "heads": 2,
            "layers": 1,
            "mlp_ratio": 2.0,
        },
    )
    return model.eval()


def build_unet(seed: int = 0) -> nn.Module:
    """A diffusers UNet2DConditionModel with one cross-attention down block and one up block."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    model = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return model.eval()


@pytest.fixture
def make_llama():
    return build_llama


@pytest.fixture
def make_clip():
    return build_clip


@pytest.fixture
def make_unet():
    return build_unet


@pytest.fixture
def input_ids() -> torch.Tensor:
    """[2, 7] token ids for the tiny Llama."""
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(0, VOCAB_SIZE, (2, 7), generator=generator)


@torch.no_grad()
def randomize_adapters(model: nn.Module, seed: int = 0, scale: float = 0.2) -> None:
    """Give every adapter parameter random values (LoRA B starts at 0, which would make tests vacuous)."""
    from lightning_moe.adapters import adapted_layers

    torch.manual_seed(seed)
    for _, layer in adapted_layers(model):
        for parameter in layer.adapter.parameters():
            parameter.copy_(torch.randn_like(parameter) * scale)


@pytest.fixture
def randomize():
    return randomize_adapters

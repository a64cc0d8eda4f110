"""Fixtures of the adapter-core tests: builders of tiny models (random weights, CPU, offline).

They return builder functions, so one test can build the same base twice (same seed ->
identical weights) or a different base (another seed or width).
"""

import pytest
import torch

from tests.tiny import VOCAB_SIZE, build_clip, build_llama, build_unet, randomize_adapters


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


@pytest.fixture
def randomize():
    return randomize_adapters

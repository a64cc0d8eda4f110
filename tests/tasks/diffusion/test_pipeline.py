"""Text-to-image sampling on a tiny UNet: our LoRAs load in diffusers and give the same images, and
each way of composing LoRAs reduces to the single LoRA where it must."""

import copy
import shutil

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from transformers import BertConfig, BertModel

from lightning_moe.adapters import (
    AdapterCheckpointError,
    AdapterConfigError,
    AdapterRule,
    LoraConfig,
    XLoraConfig,
    export_diffusers_lora,
    inject,
    load_adapter,
    save_adapter,
)
from lightning_moe.errors import UserInputError
from lightning_moe.tasks.diffusion import Composite, Merge, Switch
from lightning_moe.tasks.diffusion.pipeline import TextToImagePipeline
from lightning_moe.tokenization import byte_tokenizer
from tests.tiny import TINY_TEXT_ENCODER, TINY_UNET
from tests.tolerances import assert_same_maths

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
PROMPTS = ["a shoe", "a digit seven"]


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_UNET)


@pytest.fixture(scope="module")
def parts():
    """UNet, text encoder and tokenizer, in float64: the compositions that reduce to one LoRA do so
    through other kernels (a mixture vs the single LoRA, diffusers' loader vs ours), and are
    compared in float64 (see assert_same_maths)."""
    torch.manual_seed(0)
    settings = {key: value for key, value in TINY_TEXT_ENCODER.items() if key != "model_type"}
    encoder = BertModel(BertConfig(**settings))
    return tiny_unet().double(), encoder.eval().double(), byte_tokenizer()


def pipeline(unet, parts) -> TextToImagePipeline:
    _, encoder, tokenizer = parts
    return TextToImagePipeline(unet.eval(), encoder, tokenizer, DDIMScheduler(num_train_timesteps=100))


def sample(pipe: TextToImagePipeline, composition=None, steps: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return pipe(
        PROMPTS, num_inference_steps=steps, guidance_scale=2.0, generator=generator, composition=composition
    )


def lora_rules(rank: int) -> list[AdapterRule]:
    return [AdapterRule(ATTENTION, LoraConfig(rank=rank, alpha=2 * rank))]


def with_random_lora(unet, seed: int, rank: int = 2):
    unet = copy.deepcopy(unet)
    inject(unet, lora_rules(rank))
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in unet.parameters():
            if parameter.requires_grad:
                parameter.normal_(std=0.3)
    return unet


@pytest.fixture(scope="module")
def lora_folders(parts, tmp_path_factory):
    """Two concept LoRAs of the tiny UNet, saved in our format."""
    folders = []
    for seed in (1, 2):
        folder = tmp_path_factory.mktemp(f"lora{seed}")
        save_adapter(with_random_lora(parts[0], seed, rank=seed + 1), lora_rules(seed + 1), folder)
        folders.append(str(folder))
    return folders


def single_lora_images(parts, folder) -> torch.Tensor:
    unet = copy.deepcopy(parts[0])
    load_adapter(unet, folder)
    return sample(pipeline(unet, parts))


def mixture_pipeline(parts, folders, composition_weights) -> TextToImagePipeline:
    unet = copy.deepcopy(parts[0])
    inject(
        unet, [AdapterRule(ATTENTION, XLoraConfig(experts=list(folders), fixed_weights=composition_weights))]
    )
    return pipeline(unet, parts)


def test_pipeline_makes_images_in_the_unit_range_that_depend_on_the_prompt(parts):
    images = sample(pipeline(copy.deepcopy(parts[0]), parts))
    assert images.shape == (2, 1, 8, 8) and images.min() >= 0 and images.max() <= 1
    assert not torch.allclose(images[0], images[1])


def test_diffusers_load_lora_weights_gives_our_images(parts, tmp_path):
    ours = with_random_lora(parts[0], seed=5)
    expected = sample(pipeline(ours, parts))
    export_diffusers_lora(ours, tmp_path / "lora")
    theirs = pipeline(copy.deepcopy(parts[0]), parts)
    theirs.load_lora_weights(str(tmp_path / "lora"))
    assert not torch.allclose(expected, sample(pipeline(copy.deepcopy(parts[0]), parts)), atol=1e-3)
    assert_same_maths(sample(theirs), expected)


def test_switch_with_one_lora_equals_that_lora(parts, lora_folders):
    expected = single_lora_images(parts, lora_folders[0])
    result = sample(mixture_pipeline(parts, lora_folders[:1], [1.0]), Switch(every=2))
    assert_same_maths(result, expected)


@pytest.mark.parametrize("index", [0, 1])
def test_merge_with_one_hot_weights_equals_that_lora(parts, lora_folders, index):
    expected = single_lora_images(parts, lora_folders[index])
    weights = [1.0 - index, float(index)]
    result = sample(mixture_pipeline(parts, lora_folders, [0.5, 0.5]), Merge(weights))
    assert_same_maths(result, expected)


def test_composite_of_a_lora_with_its_copy_equals_that_lora(parts, lora_folders, tmp_path):
    expected = single_lora_images(parts, lora_folders[1])
    shutil.copytree(lora_folders[1], tmp_path / "copy")
    folders = [lora_folders[1], str(tmp_path / "copy")]
    result = sample(mixture_pipeline(parts, folders, [0.5, 0.5]), Composite())
    assert_same_maths(result, expected)


def test_compositions_set_the_weights_they_promise(parts, lora_folders):
    """Which weights each method puts on the LoRAs at each step, and that composite averages."""
    unet = mixture_pipeline(parts, lora_folders, [0.5, 0.5]).unet

    def weights_now() -> torch.Tensor:
        return next(m for m in unet.modules() if hasattr(m, "fixed_weights")).fixed_weights.clone()

    switch = Switch(every=2)
    seen = [switch.predict(unet, weights_now, step).tolist() for step in range(5)]
    assert seen == [[1, 0], [1, 0], [0, 1], [0, 1], [1, 0]]
    assert Composite().predict(unet, weights_now, 0).tolist() == [0.5, 0.5]
    assert Merge([0.3, 0.7]).predict(unet, weights_now, 0).tolist() == pytest.approx([0.3, 0.7])
    assert Merge().predict(unet, weights_now, 0).tolist() == [1.0, 1.0]
    with pytest.raises(AdapterConfigError, match="3 mixture weights given for 2 experts"):
        Merge([0.2, 0.3, 0.5]).predict(unet, weights_now, 0)
    with pytest.raises(AdapterConfigError, match="fixed-weight LoRA mixtures"):
        Composite().predict(parts[0], weights_now, 0)
    with pytest.raises(UserInputError, match="every=0"):
        Switch(every=0)


def test_diffusers_export_refuses_what_diffusers_cannot_load(parts, lora_folders, tmp_path):
    with pytest.raises(AdapterConfigError, match="plain LoRA only"):
        export_diffusers_lora(mixture_pipeline(parts, lora_folders, [0.5, 0.5]).unet, tmp_path / "mixture")
    ours = with_random_lora(parts[0], seed=5)
    export_diffusers_lora(ours, tmp_path / "lora")
    with pytest.raises(FileExistsError, match="already holds pytorch_lora_weights.safetensors"):
        export_diffusers_lora(ours, tmp_path / "lora")


def test_learned_gate_over_the_loras_samples(parts, lora_folders):
    unet = copy.deepcopy(parts[0])
    inject(unet, [AdapterRule(ATTENTION, XLoraConfig(experts=list(lora_folders)))])
    images = sample(pipeline(unet, parts))
    # a fresh X-LoRA gate starts uniform: exactly the merged average
    assert_same_maths(images, sample(mixture_pipeline(parts, lora_folders, [0.5, 0.5])))


def test_a_lora_of_another_base_or_a_missing_lora_is_one_clear_error(parts, lora_folders, tmp_path):
    other = tiny_unet(seed=9)
    with pytest.raises(AdapterCheckpointError, match="different base model"):
        inject(
            other, [AdapterRule(ATTENTION, XLoraConfig(experts=list(lora_folders), fixed_weights=[0.5, 0.5]))]
        )
    missing = str(tmp_path / "no_such_lora")
    with pytest.raises(AdapterCheckpointError, match="no_such_lora"):
        mixture_pipeline(parts, [lora_folders[0], missing], [0.5, 0.5])

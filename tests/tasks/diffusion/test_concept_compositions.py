"""CLoRA and LoRA-Composer on a tiny two-slot UNet with two random LoRAs: the identity case, what
each does at every step (which LoRA runs, with or without gradients, on which rows), that their
latent steps lower their losses, their fusion, and their errors. Float64 throughout."""

import copy

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor
from transformers import BertConfig, BertModel

from lightning_moe.adapters import AdapterRule, LoraConfig, XLoraConfig, inject, load_adapter, save_adapter
from lightning_moe.errors import UserInputError
from lightning_moe.tasks.diffusion import CLoRA, LoRAComposer
from lightning_moe.tasks.diffusion.attention_maps import box_concentration_loss
from lightning_moe.tasks.diffusion.compositions import Sampling
from lightning_moe.tasks.diffusion.concept_compositions import move_best_windows
from lightning_moe.tasks.diffusion.pipeline import TextToImagePipeline
from lightning_moe.tokenization import byte_tokenizer
from tests.tiny import TINY_CANVAS_UNET, TINY_TEXT_ENCODER
from tests.tolerances import assert_same_maths

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
PROMPTS = ["a bag on the left and a digit on the right", "a digit on the left and a bag on the right"]
LAYOUTS = [{"bag": "left", "digit": "right"}, {"digit": "left", "bag": "right"}]
CONCEPTS = ["bag", "digit"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    torch.manual_seed(0)
    settings = {key: value for key, value in TINY_TEXT_ENCODER.items() if key != "model_type"}
    encoder = BertModel(BertConfig(**settings)).eval().double()
    unet = UNet2DConditionModel(**TINY_CANVAS_UNET).double()
    unet.set_attn_processor(AttnProcessor())
    folders = []
    for seed in (1, 2):
        lora = copy.deepcopy(unet)
        rules = [AdapterRule(ATTENTION, LoraConfig(rank=2, alpha=4))]
        inject(lora, rules)
        torch.manual_seed(seed)
        with torch.no_grad():
            for parameter in lora.parameters():
                if parameter.requires_grad:
                    parameter.normal_(std=0.3)
        folder = tmp_path_factory.mktemp(f"lora{seed}")
        save_adapter(lora, rules, folder)
        folders.append(str(folder))
    return unet, encoder, folders


def pipeline(parts, folders=None) -> TextToImagePipeline:
    unet, encoder, all_folders = parts
    unet = copy.deepcopy(unet)
    folders = all_folders if folders is None else folders
    weights = [1.0] * len(folders)
    inject(unet, [AdapterRule(ATTENTION, XLoraConfig(experts=folders, fixed_weights=weights))])
    return TextToImagePipeline(unet.eval(), encoder, byte_tokenizer(), DDIMScheduler(num_train_timesteps=100))


def sample(pipe, composition=None, steps: int = 3, layouts=LAYOUTS) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return pipe(
        PROMPTS, num_inference_steps=steps, guidance_scale=2.0, generator=generator,
        composition=composition, layouts=layouts,
    )  # fmt: skip


@pytest.mark.parametrize("composition", [CLoRA(["bag"]), LoRAComposer(["bag"])], ids=["clora", "composer"])
def test_one_concept_gives_that_lora_alone(parts, composition):
    unet, encoder, folders = parts
    alone = copy.deepcopy(unet)
    load_adapter(alone, folders[0])
    generator = torch.Generator().manual_seed(3)
    plain = TextToImagePipeline(
        alone.eval(), encoder, byte_tokenizer(), DDIMScheduler(num_train_timesteps=100)
    )
    expected = plain(PROMPTS, num_inference_steps=3, guidance_scale=2.0, generator=generator)
    assert_same_maths(sample(pipeline(parts, folders[:1]), composition), expected)


def record_passes(unet) -> list[tuple]:
    """(LoRA weights, rows, gradients on) of every UNet forward."""
    passes = []
    mixture = next(module for module in unet.modules() if hasattr(module, "fixed_weights"))

    def hook(module, args, kwargs):
        passes.append((mixture.fixed_weights.tolist(), args[0].shape[0], torch.is_grad_enabled()))

    unet.register_forward_pre_hook(hook, with_kwargs=True)
    return passes


def test_clora_passes_at_every_step(parts):
    pipe = pipeline(parts)
    passes = record_passes(pipe.unet)
    images = sample(pipe, CLoRA(CONCEPTS, guidance_steps=2))
    guide = [([0.0, 0.0], 2, True), ([1.0, 0.0], 2, True), ([0.0, 1.0], 2, True)]  # base, then each LoRA
    predict = [([1.0, 0.0], 4, False), ([0.0, 1.0], 4, False)]  # each LoRA, with guidance's rows
    assert passes == (guide + predict) * 2 + predict
    assert images.shape == (2, 1, 4, 8) and images.min() >= 0 and images.max() <= 1
    assert all(isinstance(p, AttnProcessor) for p in pipe.unet.attn_processors.values())


def test_composer_passes_at_every_step(parts):
    pipe = pipeline(parts)
    passes = record_passes(pipe.unet)
    sample(pipe, LoRAComposer(CONCEPTS, guidance_steps=2))
    each = [([1.0, 0.0], 2, False), ([0.0, 1.0], 2, False)]  # the re-initialisation's maps
    guide = [([1.0, 0.0], 2, True), ([0.0, 1.0], 2, True)]
    predict = [([1.0, 0.0], 4, False), ([0.0, 1.0], 4, False)]
    assert passes == each + (guide + predict) * 2 + predict
    assert all(isinstance(p, AttnProcessor) for p in pipe.unet.attn_processors.values())


@pytest.mark.parametrize("make", [CLoRA, LoRAComposer], ids=["clora", "composer"])
def test_latent_steps_run_under_inference_mode_as_in_predict(parts, make):
    pipe = pipeline(parts)
    with torch.no_grad():
        expected = sample(pipe, make(CONCEPTS, guidance_steps=2))
    with torch.inference_mode():  # Lightning's predict loop
        got = sample(pipe, make(CONCEPTS, guidance_steps=2))
    assert_same_maths(got, expected)


def started(pipe, composition, latents):
    states, mask = pipe.encode_prompt(PROMPTS + ["", ""])
    pipe.scheduler.set_timesteps(3)
    sampling = Sampling(pipe.unet, pipe.tokenizer, PROMPTS, LAYOUTS, states, mask, pipe.scheduler)
    return composition.start(sampling, latents), states, mask


def test_composer_fuses_each_loras_noise_in_its_region(parts):
    pipe = pipeline(parts)
    composer = LoRAComposer(CONCEPTS, reinitialise=False)
    started(pipe, composer, torch.randn(2, 1, 4, 8, dtype=torch.float64))
    weights = next(m for m in pipe.unet.modules() if hasattr(m, "fixed_weights")).fixed_weights

    def noise_of_active_lora():  # 1 under the bag LoRA, 3 under the digit LoRA
        return torch.full((4, 1, 4, 8), 1.0 + 2 * float(weights[1]), dtype=torch.float64)

    fused = composer.predict(pipe.unet, noise_of_active_lora, step=0)
    composer.finish()
    bag_left = torch.tensor([1.0] * 4 + [3.0] * 4, dtype=torch.float64)
    for row, expected in enumerate([bag_left, bag_left.flip(0)] * 2):  # guidance's rows follow their prompts
        assert torch.equal(fused[row, 0, 0], expected)


@pytest.mark.parametrize("kind", ["clora", "composer"])
def test_a_latent_step_lowers_its_loss(parts, kind):
    pipe = pipeline(parts)
    latents = torch.randn(2, 1, 4, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if kind == "clora":
        composition = CLoRA(CONCEPTS, step_size=0.05)
        latents, *_ = started(pipe, composition, latents)
        timestep = pipe.scheduler.timesteps[0]

        def loss(z):
            return composition.contrastive_loss(z, timestep)
    else:
        composition = LoRAComposer(CONCEPTS, step_size=0.05, reinitialise=False)
        latents, *_ = started(pipe, composition, latents)
        timestep = pipe.scheduler.timesteps[0]

        def loss(z):
            return box_concentration_loss(composition.unconstrained_maps(z, timestep), composition.regions)

    with torch.no_grad():
        before = loss(latents)
        moved = composition.guide(latents, 0, timestep)
        after = loss(moved)
    assert not torch.equal(moved, latents) and after < before
    assert torch.equal(composition.guide(latents, 5, timestep), latents)  # past the guidance steps
    composition.finish()


def test_reinitialisation_moves_the_strongest_window_into_the_box():
    latents = torch.arange(32.0).view(1, 1, 4, 8)
    maps = torch.zeros(1, 2, 4, 8)
    maps[0, 0, :, 3:7] = 1  # concept 0 attends most at columns 3-6; its box is the left half
    regions = torch.zeros(1, 2, 4, 8)
    regions[0, 0, :, :4] = 1
    regions[0, 1, :, 4:] = 1
    moved = move_best_windows(latents, maps, regions, torch.tensor([[True, False]]))
    assert torch.equal(moved[..., :4], latents[..., 3:7])
    assert torch.equal(moved[..., 4:], latents[..., 4:])  # concept 1 is not a box to move


def test_bad_concepts_and_layouts_are_one_clear_error(parts):
    pipe = pipeline(parts)
    with pytest.raises(UserInputError, match=r"1 concepts \['bag'\] for a mixture of 2 LoRAs"):
        sample(pipe, CLoRA(["bag"]))
    with pytest.raises(UserInputError, match="'sandal' is not in the prompt"):
        sample(pipe, CLoRA(["bag", "sandal"]))
    with pytest.raises(UserInputError, match="LoRAComposer needs a layout per prompt"):
        sample(pipe, LoRAComposer(CONCEPTS), layouts=None)
    with pytest.raises(UserInputError, match="places no concept 'digit'"):
        sample(pipe, LoRAComposer(CONCEPTS), layouts=[{"bag": "left"}] * 2)
    assert all(isinstance(p, AttnProcessor) for p in pipe.unet.attn_processors.values())

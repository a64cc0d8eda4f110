"""Compositions that steer where each LoRA's concept goes, through the cross-attention maps:
CLoRA (Meral et al., 2024) and LoRA-Composer (Yang et al., 2024), on any UNet2DConditionModel
(attention.py installs the processors for one batch and restores the UNet's own after).

Each LoRA of the fixed-weight mixture has a concept, given as the words that name it in the
prompts (`concepts`, in the mixture's expert order). With one LoRA both reduce to that LoRA alone.

- `CLoRA`: for the first `guidance_steps`, a contrastive loss on the concept maps of the base
  pass and of each LoRA's pass moves the latent (a step of RMS-normalised gradient); at every
  step each LoRA predicts the noise alone, and masks from its concept's map fuse the predictions.
- `LoRAComposer`: needs each prompt's layout (concept words -> canvas region). Each concept's
  tokens are attendable only from its region (injection) and the object regions do not attend to
  each other (isolation); the latent is re-initialised so that each concept's strongest window
  of starting noise lies in its box, and moved for the first `guidance_steps` to concentrate
  each concept's (unconstrained) attention in its box; the LoRAs' predictions are fused by the
  regions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_moe.adapters import fixed_mixture_size, set_mixture_weights
from lightning_moe.data.canvas import SLOTS, region_mask
from lightning_moe.errors import UserInputError
from lightning_moe.tasks.diffusion.attention import AttentionControl, install_processors
from lightning_moe.tasks.diffusion.attention_maps import (
    box_concentration_loss,
    concept_token_indices,
    contrastive_map_loss,
    fuse_noise,
    masks_from_maps,
)
from lightning_moe.tasks.diffusion.compositions import Composition, NoisePrediction, Sampling, one_hot


@dataclass
class ConceptComposition(Composition):
    """What CLoRA and LoRA-Composer share: concept tokens per prompt, attention control for the
    batch, one pass per LoRA, and the latent step.

    Args:
        concepts: The words naming each LoRA's concept in the prompts, in expert order.
        guidance_steps: The first denoising steps at which the latent is moved.
        step_size: The size of a latent step, in units of the gradient's RMS per image.
    """

    concepts: list[str]
    guidance_steps: int = 5
    step_size: float = 0.5

    def __post_init__(self) -> None:
        # the state of the batch being sampled, between start and finish
        self.sampling: Sampling | None = None
        self.control: AttentionControl | None = None
        self.own_processors: dict | None = None
        self.tokens: list[list[list[int]]] = []

    def start(self, sampling: Sampling, latents: Tensor) -> Tensor:
        count = fixed_mixture_size(sampling.unet)
        if len(self.concepts) != count:
            raise UserInputError(
                f"{type(self).__name__} got {len(self.concepts)} concepts {self.concepts} for a mixture "
                f"of {count} LoRAs; give one concept (its words in the prompts) per LoRA"
            )
        self.sampling = sampling
        self.tokens = [
            [concept_token_indices(sampling.tokenizer, prompt, words) for words in self.concepts]
            for prompt in sampling.prompts
        ]
        self.control = AttentionControl(*latents.shape[-2:])
        if count > 1:
            self.own_processors = install_processors(sampling.unet, self.control)
        return latents

    def finish(self) -> None:
        if self.own_processors is not None:
            self.sampling.unet.set_attn_processor(self.own_processors)
        self.sampling = self.control = self.own_processors = None

    @property
    def composing(self) -> bool:
        return len(self.concepts) > 1

    def concept_maps(self) -> Tensor:
        """The last pass's maps for the prompts' concepts: [prompts, concepts, H, W]."""
        maps = self.control.token_maps()
        return torch.stack(
            [
                torch.stack([maps[row, positions].mean(0) for positions in concepts])
                for row, concepts in enumerate(self.tokens)
            ]
        )

    def use_lora(self, index: int | None) -> None:
        """Only LoRA `index` on (None: the base, every LoRA off); clears the recorded maps."""
        count = len(self.concepts)
        set_mixture_weights(self.sampling.unet, [0.0] * count if index is None else one_hot(index, count))
        self.control.maps.clear()

    def moved(self, latents: Tensor, loss_of_latents) -> Tensor:
        """The latents after one step down the gradient of `loss_of_latents`, RMS-normalised per image."""
        with torch.enable_grad():
            variable = latents.detach().requires_grad_(True)
            (gradient,) = torch.autograd.grad(loss_of_latents(variable), variable)
        rms = gradient.flatten(1).pow(2).mean(-1).sqrt().clamp(min=1e-12).view(-1, *[1] * (gradient.ndim - 1))
        return (latents - self.step_size * gradient / rms).detach()

    def fused(self, predict_noise: NoisePrediction, masks_of_pass) -> Tensor:
        """Each LoRA's noise alone, fused by the mask [prompts, H, W] masks_of_pass gives each."""
        noises, masks = [], []
        for index in range(len(self.concepts)):
            self.use_lora(index)
            noises.append(predict_noise())
            masks.append(masks_of_pass(index))
        return fuse_noise(noises, torch.stack(masks, 1))

    def alone(self, unet: nn.Module, predict_noise: NoisePrediction) -> Tensor:
        set_mixture_weights(unet, [1.0])
        return predict_noise()


@dataclass
class CLoRA(ConceptComposition):
    """Contrastive guidance of the concept maps, then fusion by masks from them.

    Args:
        temperature: Of the InfoNCE over maps.
        mask_threshold: A LoRA's mask is where its concept's min-max-normalised map exceeds this.
        **kwargs: `concepts`, `guidance_steps` and `step_size` of ConceptComposition.
    """

    temperature: float = 0.5
    mask_threshold: float = 0.5

    def guide(self, latents: Tensor, step: int, timestep: Tensor) -> Tensor:
        if not self.composing or step >= self.guidance_steps:
            return latents
        return self.moved(latents, lambda variable: self.contrastive_loss(variable, timestep))

    def contrastive_loss(self, latents: Tensor, timestep: Tensor) -> Tensor:
        """Views of each concept: its map in the base pass and in its own LoRA's pass."""
        self.control.record = True
        self.use_lora(None)
        self.sampling.conditional_noise(latents, timestep)
        base = self.concept_maps()
        own = []
        for index in range(len(self.concepts)):
            self.use_lora(index)
            self.sampling.conditional_noise(latents, timestep)
            own.append(self.concept_maps()[:, index])
        self.control.record = False
        return contrastive_map_loss(torch.stack([base, torch.stack(own, 1)], 1), self.temperature)

    def predict(self, unet: nn.Module, predict_noise: NoisePrediction, step: int) -> Tensor:
        if not self.composing:
            return self.alone(unet, predict_noise)
        self.control.record = True
        noise = self.fused(
            predict_noise,
            lambda index: masks_from_maps(self.concept_maps()[:, index : index + 1], self.mask_threshold)[
                :, 0
            ],
        )
        self.control.record = False
        return noise


@dataclass
class LoRAComposer(ConceptComposition):
    """Region-constrained attention, a layout-guided latent, and fusion by the layout's regions.

    Args:
        reinitialise: Move each object concept's strongest window of starting noise into its box.
        isolate: Object regions do not attend to each other in self-attention.
        **kwargs: `concepts`, `guidance_steps` and `step_size` of ConceptComposition.
    """

    reinitialise: bool = True
    isolate: bool = True

    def start(self, sampling: Sampling, latents: Tensor) -> Tensor:
        latents = super().start(sampling, latents)
        self.regions = self.layout_regions(sampling.layouts, *latents.shape[-2:]).to(latents)
        # the object concepts (a slot each); styles such as framed are everywhere on the border
        self.boxes = torch.tensor(
            [[layout[words] in SLOTS for words in self.concepts] for layout in sampling.layouts]
        )
        if not self.composing:
            return latents
        tokens = sampling.states.shape[1]
        allowed = latents.new_ones(len(self.tokens), tokens, *latents.shape[-2:])
        for row, concepts in enumerate(self.tokens):
            for index, positions in enumerate(concepts):
                allowed[row, positions] = self.regions[row, index]
        self.control.token_regions = allowed
        if self.isolate:
            self.control.slot_labels = self.slot_labels().to(latents.device)
        if self.reinitialise:
            maps = self.unconstrained_maps(latents, sampling.scheduler.timesteps[0])
            latents = move_best_windows(latents, maps, self.regions, self.boxes)
        return latents

    def layout_regions(self, layouts: list[dict[str, str]] | None, height: int, width: int) -> Tensor:
        """[prompts, concepts, H, W]: each concept's region, from each prompt's layout."""
        if layouts is None:
            raise UserInputError(
                "LoRAComposer needs a layout per prompt (concept words -> region): use "
                "lightning_moe.data.canvas.CanvasPromptDataModule"
            )
        regions = []
        for layout in layouts:
            missing = [words for words in self.concepts if words not in layout]
            if missing:
                raise UserInputError(f"the layout {layout} places no concept {missing[0]!r}")
            regions.append(
                torch.stack([region_mask(layout[words], height, width) for words in self.concepts])
            )
        return torch.stack(regions)

    def slot_labels(self) -> Tensor:
        """[prompts, H, W]: k + 1 on the slot of object concept k, 0 elsewhere."""
        labels = torch.zeros(self.regions.shape[0], *self.regions.shape[-2:], dtype=torch.long)
        for row, concept in self.boxes.nonzero().tolist():
            labels[row][self.regions[row, concept].bool().cpu()] = concept + 1
        return labels

    def unconstrained_maps(self, latents: Tensor, timestep: Tensor) -> Tensor:
        """Each concept's map under its own LoRA, without the injection constraint."""
        self.control.constrain, self.control.record = False, True
        maps = []
        for index in range(len(self.concepts)):
            self.use_lora(index)
            self.sampling.conditional_noise(latents, timestep)
            maps.append(self.concept_maps()[:, index])
        self.control.constrain, self.control.record = True, False
        return torch.stack(maps, 1)

    def guide(self, latents: Tensor, step: int, timestep: Tensor) -> Tensor:
        if not self.composing or step >= self.guidance_steps:
            return latents
        return self.moved(
            latents,
            lambda variable: box_concentration_loss(
                self.unconstrained_maps(variable, timestep), self.regions
            ),
        )

    def predict(self, unet: nn.Module, predict_noise: NoisePrediction, step: int) -> Tensor:
        if not self.composing:
            return self.alone(unet, predict_noise)
        return self.fused(predict_noise, lambda index: self.regions[:, index])


def move_best_windows(latents: Tensor, maps: Tensor, regions: Tensor, boxes: Tensor) -> Tensor:
    """Per prompt and concept with `boxes[prompt, concept]`: the window of the box's size where the
    concept's map [prompts, concepts, H, W] sums highest, copied from the starting `latents` into
    the box (the bounding box of its region). Every copy reads the original latents."""
    moved = latents.clone()
    for row, concept in boxes.nonzero().tolist():
        rows, columns = regions[row, concept].nonzero(as_tuple=True)
        top, left = int(rows.min()), int(columns.min())
        height, width = int(rows.max()) - top + 1, int(columns.max()) - left + 1
        sums = F.avg_pool2d(maps[row, concept][None, None], (height, width), stride=1)[0, 0]
        source_top, source_left = divmod(int(sums.flatten().argmax()), sums.shape[-1])
        moved[row, :, top : top + height, left : left + width] = latents[
            row, :, source_top : source_top + height, source_left : source_left + width
        ]
    return moved

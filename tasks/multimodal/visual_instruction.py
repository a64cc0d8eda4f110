"""Visual instruction tuning (LLaVA recipe) with plain LoRA or MoLE in the language model.

Stage "align" (`adapters: []`): only the projector trains, the LM and the vision encoder stay
frozen. Stage "instruct": adapters (LoRA, or MoLE's top-1 experts on the MLP plus LoRA on
attention) train together with the projector, which keeps its own learning rate (`extra_lr`).
Lightning checkpoints hold projector + adapters + routers; the exported adapter folder holds the
adapters and `projector.safetensors`. Evaluation generates answers greedily and scores them per
domain (normalised exact match); at test time TensorBoard also gets which experts each domain's
tokens went to.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lightning_moe.adapters.routing import MODALITIES, TokenModalities
from lightning_moe.data.llava import DOMAINS
from lightning_moe.data.visual_instructions import slot_token_id
from lightning_moe.errors import UserInputError
from lightning_moe.module import AdapterModule
from lightning_moe.parallel import full_tensor
from lightning_moe.routing_logging import GroupRouting
from lightning_moe.tasks.multimodal.audio_encoder import load_audio_encoder
from lightning_moe.tasks.multimodal.vision_language import VisionLanguageModel, build_vision_encoder
from lightning_moe.tasks.reasoning.answer_match import NormalizedMatch, normalize_answer
from lightning_moe.tasks.reasoning.causal_lm import build_causal_lm, greedy_generation
from lightning_moe.tensorboard_views import add_text, markdown_table
from lightning_moe.tokenization import load_tokenizer

PROJECTOR_FILE = "projector.safetensors"
AUDIO_PROJECTOR_FILE = "audio_projector.safetensors"


class VisualInstructionTask(AdapterModule):
    """A LLaVA-style model (vision encoder -> projector -> causal LM) tuned on visual instructions.

    The CLI links `tokenizer`, `image_token`, `audio_token` and `domains` from the data module
    (see `VisualInstructionDataModule`), so model and data always agree on them.

    Args:
        tokenizer: The LM's tokenizer (asset name, folder, hub id or "bytes").
        image_token: The token that marks image slots in the prompt.
        audio_token: The token that marks audio slots (with `audio_encoder`).
        domains: The domains scored separately.
        language_model: A packaged asset name, folder or hub id of a causal LM.
        language_model_config: Instead: a config dict (with `model_type`) for a random tiny LM.
        vision_encoder: "efficientnet-lite0" (packaged weights) or any timm model name.
        pretrained_vision: Load the encoder's pretrained weights (False: random, for tests).
        projector_path: A trained projector (`projector.safetensors`, e.g. from the align stage) to
            start from. A `projector.safetensors` inside `adapter_path` takes precedence.
        audio_encoder: The folder a stage-0 `SpokenDigitTask` run exported (None: no audio).
        audio_projector_path: A trained audio projector (`audio_projector.safetensors`) to start
            from; one inside `adapter_path` takes precedence.
        max_new_tokens: Generation budget per answer.
        samples_to_log: How many questions of each evaluation go to TensorBoard's text tab with
            their generations (0: none).
        model_seed: Seed of a `language_model_config` model and of the projector's initialisation.
        modality_scope: What MoE routers with `expert_modalities` see as a token's modality:
            "token": image-slot tokens are image, audio-slot tokens audio, every other token (and
            every generated one) text; "sample": every token of a sample with an image is image,
            of one with audio audio (Uni-MoE's modality experts serve the whole sample).
        cache_dir: Where converted packaged assets are cached.
        **kwargs: Adapter and optimisation settings of `AdapterModule`.
    """

    def __init__(
        self,
        tokenizer: str = "smollm2-135m-instruct",
        image_token: str = "<|endoftext|>",
        audio_token: str | None = None,
        domains: list[str] | None = None,
        language_model: str | None = "smollm2-135m-instruct",
        language_model_config: dict[str, Any] | None = None,
        vision_encoder: str = "efficientnet-lite0",
        pretrained_vision: bool = True,
        projector_path: str | None = None,
        audio_encoder: str | None = None,
        audio_projector_path: str | None = None,
        max_new_tokens: int = 8,
        samples_to_log: int = 6,
        model_seed: int = 0,
        modality_scope: Literal["token", "sample"] = "token",
        cache_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if language_model_config is not None:
            language_model = None
        self.tokenizer_name = tokenizer
        self.samples_to_log = samples_to_log
        self.image_token = image_token
        self.domains = list(domains or DOMAINS)
        self.language_model_name = language_model
        self.language_model_config = language_model_config
        self.vision_encoder_name = vision_encoder
        self.pretrained_vision = pretrained_vision
        self.projector_path = projector_path
        if audio_encoder is not None and audio_token is None:
            raise UserInputError(
                f"audio_encoder {audio_encoder} needs the data module's audio_token (the token of the audio slots)"
            )
        self.audio_token = audio_token
        self.audio_encoder = audio_encoder
        self.audio_projector_path = audio_projector_path
        self.max_new_tokens = max_new_tokens
        self.model_seed = model_seed
        self.cache_dir = cache_dir
        self.answer_metrics = nn.ModuleDict()
        self.modality_scope = modality_scope
        self.domain_routing = GroupRouting("domain")
        self.modality_routing = GroupRouting("modality", share_scalar="modality_expert_share")

    # --- model --------------------------------------------------------------------------------
    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return load_tokenizer(self.tokenizer_name, self.cache_dir)

    def build_model(self) -> nn.Module:
        language_model = build_causal_lm(
            self.language_model_name,
            self.language_model_config,
            self.model_seed,
            torch.float32,
            self.cache_dir,
        )
        vision = build_vision_encoder(self.vision_encoder_name, self.pretrained_vision, self.cache_dir)
        audio = load_audio_encoder(self.audio_encoder) if self.audio_encoder else None
        audio_id = slot_token_id(self.tokenizer, self.audio_token, "audio_token") if audio else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.model_seed)  # the same projector start in every run of a seed
            model = VisionLanguageModel(
                vision, language_model, slot_token_id(self.tokenizer, self.image_token), audio, audio_id
            )
        # a saved adapter folder carries the projectors trained with it, which win over the start points
        for module, file, start in (
            (model.projector, PROJECTOR_FILE, self.projector_path),
            (model.audio_projector, AUDIO_PROJECTOR_FILE, self.audio_projector_path),
        ):
            source = self._in_adapter_path(file) or start
            if module is not None and source:
                _load_projector(module, source)
        return model

    def _in_adapter_path(self, file: str) -> str | None:
        if self.adapter_path and (Path(self.adapter_path) / file).is_file():
            return str(Path(self.adapter_path) / file)
        return None

    def _connectors(self) -> dict[str, tuple[str, nn.Module]]:
        """{checkpoint name: (export file, module)} of the projectors, which train whole."""
        found = {"model.projector": (PROJECTOR_FILE, self.model.projector)}
        if self.model.audio_projector is not None:
            found["model.audio_projector"] = (AUDIO_PROJECTOR_FILE, self.model.audio_projector)
        return found

    def trainable_modules(self) -> dict[str, nn.Module]:
        if self.model is None:
            return {}
        return {name: module for name, (_, module) in self._connectors().items()}

    def exported_modules(self) -> dict[str, dict[str, Tensor]]:
        # gathered on every process (a sharded projector), written with the adapters in one step
        return {
            file: {k: full_tensor(v) for k, v in module.state_dict().items()}
            for file, module in self._connectors().values()
        }

    # --- steps ----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        for domain in self.domains:
            if domain not in self.answer_metrics:
                self.answer_metrics[domain] = NormalizedMatch()

    def token_modalities(self, input_ids: Tensor, scope: str | None = None) -> TokenModalities:
        """Each token's modality under `scope` (default: `modality_scope`) for the routers that
        restrict by it."""
        kinds = torch.full_like(input_ids, MODALITIES.index("text"))
        kinds[input_ids == self.model.image_token_id] = MODALITIES.index("image")
        if self.model.audio_token_id is not None:
            kinds[input_ids == self.model.audio_token_id] = MODALITIES.index("audio")
        if (scope or self.modality_scope) == "sample":
            per_sample = kinds.max(dim=1).values  # a sample's media (text < image < audio in MODALITIES)
            return TokenModalities(per_sample[:, None].expand_as(input_ids), per_sample)
        return TokenModalities(kinds, torch.full_like(input_ids[:, 0], MODALITIES.index("text")))

    def task_loss(self, batch: dict) -> tuple[Tensor, Tensor | None]:
        with self.injection.collector.modalities(self.token_modalities(batch["input_ids"])):
            output = self.model(
                batch["input_ids"],
                batch["attention_mask"],
                batch["pixel_values"],
                batch["labels"],
                batch.get("audio_features"),
            )
        return output.loss, batch["attention_mask"]

    def generate(self, batch: dict) -> list[str]:
        tokenizer = self.tokenizer
        settings = greedy_generation(tokenizer, self.max_new_tokens)
        with self.injection.collector.modalities(self.token_modalities(batch["prompt_ids"])):
            tokens = self.model.generate(
                batch["prompt_ids"],
                batch["prompt_mask"],
                batch["pixel_values"],
                batch.get("audio_features"),
                generation_config=settings,
            )
        return [text.strip() for text in tokenizer.batch_decode(tokens, skip_special_tokens=True)]

    def _score(self, batch: dict, batch_idx: int, stage: str) -> None:
        outputs = self.generate(batch)
        for domain in set(batch["domain"]):
            rows = [i for i, d in enumerate(batch["domain"]) if d == domain]
            metric = self.answer_metrics[domain]
            metric.update([outputs[i] for i in rows], [batch["reference"][i] for i in rows])
            self.log(f"{stage}/accuracy/{domain}", metric, on_step=False, on_epoch=True, batch_size=len(rows))
        if batch_idx == 0 and self.samples_to_log:
            self.log_samples(batch, outputs, stage)

    def log_samples(self, batch: dict, outputs: list[str], stage: str) -> None:
        """The first questions of the evaluation with their generations, as a TensorBoard text table."""
        rows = [
            [
                domain,
                question,
                output,
                reference,
                "yes" if normalize_answer(output) == normalize_answer(reference) else "no",
            ]
            for domain, question, output, reference in zip(
                batch["domain"], batch["question"], outputs, batch["reference"], strict=True
            )
        ][: self.samples_to_log]
        table = markdown_table(["domain", "question", "generation", "answer", "match"], rows)
        add_text(self.logger, f"{stage}/samples", table, self.global_step)

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss = super().validation_step(batch, batch_idx)
        self._count_routing(batch)
        self._score(batch, batch_idx, "val")
        return loss

    def test_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss = super().test_step(batch, batch_idx)
        self._count_routing(batch)
        self._score(batch, batch_idx, "test")
        return loss

    def _count_routing(self, batch: dict) -> None:
        """Which experts each domain's and each modality's tokens went to in the loss pass just
        run (the collector keeps what it captured)."""
        records, mask = self.injection.collector.records, batch["attention_mask"]
        domains = sorted(set(batch["domain"]))
        per_sample = torch.tensor([domains.index(d) for d in batch["domain"]])
        self.domain_routing.update(records, mask, per_sample[:, None].expand_as(mask), domains)
        by_token = self.token_modalities(batch["input_ids"], "token").tokens  # image slots vs text
        self.modality_routing.update(records, mask, by_token, list(MODALITIES))

    def on_validation_epoch_end(self) -> None:
        self.domain_routing.log(self, "val")
        self.modality_routing.log(self, "val")

    def on_test_epoch_end(self) -> None:
        self.domain_routing.log(self, "test")
        self.modality_routing.log(self, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        records = []
        for domain, question, reference, output in zip(
            batch["domain"], batch["question"], batch["reference"], self.generate(batch), strict=True
        ):
            record = {"domain": domain, "question": question, "reference": reference, "generation": output}
            if reference:
                record["correct"] = normalize_answer(output) == normalize_answer(reference)
            records.append(record)
        return records


def _load_projector(projector: nn.Module, path: str) -> None:
    if not Path(path).is_file():
        raise UserInputError(f"projector file {path} does not exist")
    state = load_file(path)
    expected = projector.state_dict()
    if set(state) != set(expected) or any(state[k].shape != v.shape for k, v in expected.items()):
        raise UserInputError(
            f"{path} does not fit this projector: it has {sorted((k, list(v.shape)) for k, v in state.items())[:2]}..., "
            f"the model needs {sorted((k, list(v.shape)) for k, v in expected.items())[:2]}..."
        )
    projector.load_state_dict(state)

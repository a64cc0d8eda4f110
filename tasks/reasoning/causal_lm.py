"""Causal language-model fine-tuning with any adapter kind (LoRA, MoLE, MixLoRA) on a frozen LM."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerBase

from lightning_moe.assets import resolve_pretrained
from lightning_moe.errors import UserInputError
from lightning_moe.module import AdapterModule


def build_causal_lm(
    name_or_path: str | None,
    config: dict | None,
    seed: int,
    dtype: torch.dtype,
    cache_dir: str | None = None,
) -> nn.Module:
    """A pretrained LM from an asset name, folder or hub id, or a randomly initialised one from a
    config dict."""
    if (name_or_path is None) == (config is None):
        raise UserInputError(
            "give exactly one of `model` (an asset name, folder or hub id) and `model_config` (a config dict)"
        )
    if name_or_path is not None:
        return AutoModelForCausalLM.from_pretrained(resolve_pretrained(name_or_path, cache_dir), dtype=dtype)
    config = dict(config)
    model_type = config.pop("model_type", None)
    if model_type is None:
        raise UserInputError(f"model_config needs a 'model_type' (e.g. 'llama'); got keys {sorted(config)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same config always gives the same base weights
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config), dtype=dtype)


def greedy_generation(tokenizer: PreTrainedTokenizerBase, max_new_tokens: int) -> GenerationConfig:
    """Greedy decoding settings that stop at the tokenizer's end of turn and pad with its pad token."""
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


class CausalLMTask(AdapterModule):
    """Supervised fine-tuning of a causal LM; the loss covers the labelled (completion) tokens.

    Args:
        model: A packaged asset name (e.g. "smollm2-135m-instruct"), a Hugging Face model folder
            or a hub id.
        model_config: Instead of `model`: a config dict (with `model_type`) for a randomly
            initialised model, e.g. a tiny Llama for tests and smoke runs.
        model_seed: Seed for the random initialisation of a `model_config` model.
        dtype: Parameter dtype of the base model ("float32" or "bfloat16").
        cache_dir: Where converted packaged assets are cached (default: see `lightning_moe.assets`).
        **kwargs: Adapter and optimisation settings of `AdapterModule`.
    """

    def __init__(
        self,
        model: str | None = None,
        model_config: dict[str, Any] | None = None,
        model_seed: int = 0,
        dtype: str = "float32",
        cache_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model_name_or_path = model
        self.model_config = model_config
        self.model_seed = model_seed
        self.dtype_name = dtype
        self.cache_dir = cache_dir

    def build_model(self) -> nn.Module:
        return build_causal_lm(
            self.model_name_or_path,
            self.model_config,
            self.model_seed,
            getattr(torch, self.dtype_name),
            self.cache_dir,
        )

    def task_loss(self, batch: dict) -> tuple[Tensor, Tensor | None]:
        output = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        )
        return output.loss, batch["attention_mask"]

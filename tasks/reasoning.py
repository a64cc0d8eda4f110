"""Math reasoning: supervised fine-tuning of a causal LM on worked solutions, evaluated by greedy
generation with GSM8K's strict-match and flexible-extract scores."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lightning_moe.adapters.errors import UserInputError
from lightning_moe.tasks.answer_match import AnswerMatch, answers_match, extract_answer
from lightning_moe.tasks.causal_lm import CausalLMTask, greedy_generation

EXTRACTIONS = ("strict", "flexible")


class ReasoningTask(CausalLMTask):
    """SFT of a causal LM with any adapter kind; validation and test also generate answers
    greedily and log `<stage>/strict_match` and `<stage>/flexible_match`. `predict` returns one
    record per problem (prompt, generation, extracted answers, correctness).

    The data module provides the tokenizer (`datamodule.tokenizer`) and evaluation batches with
    `prompt_ids`, `prompt_mask`, `prompt_text` and `reference` (see `MathDataModule`).

    Args:
        max_new_tokens: Generation budget per answer.
        generate_in_validation: Generate and score during validation (test always does).
        **kwargs: Model, adapter and optimisation settings of `CausalLMTask`.
    """

    def __init__(self, max_new_tokens: int = 256, generate_in_validation: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_new_tokens = max_new_tokens
        self.generate_in_validation = generate_in_validation
        self.answer_metrics = nn.ModuleDict(
            {f"{stage}_{kind}": AnswerMatch(kind) for stage in ("val", "test") for kind in EXTRACTIONS}
        )

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        tokenizer = getattr(getattr(self.trainer, "datamodule", None), "tokenizer", None)
        if tokenizer is None:
            raise UserInputError(
                "ReasoningTask decodes generations with the data module's `tokenizer`; "
                "use a data module that has one (e.g. MathDataModule)"
            )
        return tokenizer

    @torch.no_grad()
    def generate(self, batch: dict) -> list[str]:
        """Greedy completions of the batch's left-padded prompts, decoded without special tokens."""
        tokenizer = self.tokenizer
        settings = greedy_generation(tokenizer, self.max_new_tokens)
        prompts = batch["prompt_ids"]
        tokens = self.model.generate(
            input_ids=prompts, attention_mask=batch["prompt_mask"], generation_config=settings
        )
        return tokenizer.batch_decode(tokens[:, prompts.shape[1] :], skip_special_tokens=True)

    def _score(self, batch: dict, stage: str) -> None:
        outputs = self.generate(batch)
        for kind in EXTRACTIONS:
            metric = self.answer_metrics[f"{stage}_{kind}"]
            metric.update(outputs, batch["reference"])
            self.log(f"{stage}/{kind}_match", metric, on_step=False, on_epoch=True, batch_size=len(outputs))

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = super().validation_step(batch, batch_idx)
        if self.generate_in_validation:
            self._score(batch, "val")
        return loss

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = super().test_step(batch, batch_idx)
        self._score(batch, "test")
        return loss

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        records = []
        for prompt, domain, reference, output in zip(
            batch["prompt_text"], batch["domain"], batch["reference"], self.generate(batch), strict=True
        ):
            record = {"prompt": prompt, "domain": domain, "reference": reference, "generation": output}
            for kind in EXTRACTIONS:
                answer = extract_answer(output, kind)
                record[f"{kind}_answer"] = answer
                record[f"{kind}_correct"] = answers_match(answer, reference)
            records.append(record)
        return records

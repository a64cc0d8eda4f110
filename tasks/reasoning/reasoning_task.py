"""Math reasoning: supervised fine-tuning of a causal LM on worked solutions, evaluated by greedy
generation with GSM8K's strict-match and flexible-extract scores."""

from __future__ import annotations

from functools import cached_property
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lightning_moe.tasks.reasoning.answer_match import AnswerMatch, answers_match, extract_answer
from lightning_moe.tasks.reasoning.causal_lm import CausalLMTask, greedy_generation
from lightning_moe.tensorboard_views import add_text, markdown_table
from lightning_moe.tokenization import load_tokenizer

EXTRACTIONS = ("strict", "flexible")


class ReasoningTask(CausalLMTask):
    """SFT of a causal LM with any adapter kind; validation and test also generate answers
    greedily and log `<stage>/strict_match` and `<stage>/flexible_match`. `predict` returns one
    record per problem (prompt, generation, extracted answers, correctness).

    Evaluation batches carry `prompt_ids`, `prompt_mask`, `prompt_text` and `reference` (see
    `MathDataModule`).

    Args:
        tokenizer: The tokenizer that decodes generations; the CLI links it from the data
            module's `tokenizer`, so both always agree.
        max_new_tokens: Generation budget per answer.
        generate_in_validation: Generate and score during validation (test always does).
        samples_to_log: How many problems of each evaluation go to TensorBoard's text tab with
            their generations (0: none).
        **kwargs: Model, adapter and optimisation settings of `CausalLMTask`.
    """

    def __init__(
        self,
        tokenizer: str = "smollm2-135m-instruct",
        max_new_tokens: int = 256,
        generate_in_validation: bool = True,
        samples_to_log: int = 6,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.tokenizer_name = tokenizer
        self.max_new_tokens = max_new_tokens
        self.generate_in_validation = generate_in_validation
        self.samples_to_log = samples_to_log
        self.answer_metrics = nn.ModuleDict(
            {f"{stage}_{kind}": AnswerMatch(kind) for stage in ("val", "test") for kind in EXTRACTIONS}
        )

    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return load_tokenizer(self.tokenizer_name, self.cache_dir)

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

    def _score(self, batch: dict, batch_idx: int, stage: str) -> list[str]:
        """Generate for an evaluation batch, update and log its scores; the generations."""
        outputs = self.generate(batch)
        for kind in EXTRACTIONS:
            metric = self.answer_metrics[f"{stage}_{kind}"]
            metric.update(outputs, batch["reference"])
            self.log(f"{stage}/{kind}_match", metric, on_step=False, on_epoch=True, batch_size=len(outputs))
        if batch_idx == 0 and self.samples_to_log:
            self.log_samples(batch, outputs, stage)
        return outputs

    def log_samples(self, batch: dict, outputs: list[str], stage: str) -> None:
        """The first problems of the evaluation with their generations, as a TensorBoard text table."""
        rows = []
        for prompt, reference, output in list(
            zip(batch["prompt_text"], batch["reference"], outputs, strict=True)
        )[: self.samples_to_log]:
            strict = answers_match(extract_answer(output, "strict"), reference)
            rows.append([prompt[:300], output.strip()[:300], reference, "yes" if strict else "no"])
        table = markdown_table(["problem", "generation", "answer", "strict match"], rows)
        add_text(self.logger, f"{stage}/samples", table, self.global_step)

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = super().validation_step(batch, batch_idx)
        if self.generate_in_validation:
            self._score(batch, batch_idx, "val")
        return loss

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = super().test_step(batch, batch_idx)
        self._score(batch, batch_idx, "test")
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

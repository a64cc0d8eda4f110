"""Reinforcement learning on verifiable rewards: GRPO and Dr. GRPO with any adapter kind as the policy.

One training step takes a batch of prompts (`VerifiedPrompts`) and
1. samples `group_size` completions of each from the model's own `generate` (a seed that is a
   function of the run's seed, the step and the process, so a resumed run samples the same);
2. scores them with the tasks' reasoning-gym verifiers (`rewards.py`) and turns the rewards into
   group advantages (`policy_gradient.py`);
3. takes `inner_updates` optimizer steps on the clipped objective (manual optimisation), each over
   micro-batches of `micro_batch_size` completions whose losses add up to the whole batch's.

The reference policy of the KL term is the same model with its adapters switched off
(`adapters_disabled`). Every adapter here is additive: an adapted layer computes base(x) +
adapter(x), and with the adapter off it computes base(x), the frozen base layer itself. Nothing
else of the model trains, so the model with adapters off IS the base model, bit for bit, and no
second copy is needed. (A run that starts from an SFT adapter, `adapter_path`, trains that adapter
on: its reference is still the base, as in TRL with peft.)
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from torch import Tensor
from torchmetrics import MeanMetric
from transformers import GenerationConfig

from lightning_moe.adapters import adapters_disabled
from lightning_moe.data.math_problems import ANSWER_MARKER
from lightning_moe.data.verified_prompts import VerifiedPrompts
from lightning_moe.errors import UserInputError
from lightning_moe.non_finite import stop_on_non_finite_terms
from lightning_moe.tasks.reasoning.policy_gradient import (
    LossType,
    PolicyLossParts,
    completion_log_probs,
    group_advantages,
    policy_loss,
)
from lightning_moe.tasks.reasoning.reasoning_task import ReasoningTask
from lightning_moe.tasks.reasoning.rewards import AnswerExtraction, score_completions
from lightning_moe.tensorboard_views import add_text, markdown_table

# Lightning warns that a checkpoint of a manually optimised step holds the state after it: here
# that is the intent (a resumed run continues with the next rollout)
warnings.filterwarnings(
    "ignore", message="Using ModelCheckpoint with manual optimization and every_n_train_steps"
)


def completion_mask(completions: Tensor, eos_token_id: int) -> Tensor:
    """1 for each completion's tokens up to and including its first end-of-sequence token."""
    is_eos = completions == eos_token_id
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), completions.shape[1])
    return (torch.arange(completions.shape[1], device=completions.device) <= first.unsqueeze(1)).long()


class GRPOTask(ReasoningTask):
    """GRPO / Dr. GRPO of a causal LM's adapters on reasoning-gym tasks (see the module docstring).
    Validation and test generate greedily, as `ReasoningTask` does, and also log the verifier's
    score (`<stage>/verifier_score`).

    Args:
        data: The `VerifiedPrompts` data module (the CLI links it): its verifiers score rewards.
        group_size: Completions sampled per prompt (G).
        temperature: Sampling temperature (also divides the logits of the loss, as in TRL).
        top_p: Nucleus sampling mass (1: off).
        top_k: Sample among the k likeliest tokens only (0: off).
        loss_type: "grpo" (advantages divided by the group's std, per-completion token means) or
            "dr_grpo" (no division, every token summed over a constant).
        scale_rewards: Divide advantages by the group's std (default: True for grpo, False for dr_grpo).
        epsilon: Clip range of the importance ratio, below 1.
        epsilon_high: Clip range above 1 (default: `epsilon`).
        beta: Weight of KL(policy || reference); 0 leaves the reference pass out.
        inner_updates: Optimizer steps per rollout batch (mu); each step counts as a training step.
        micro_batch_size: Completions per forward/backward (default: all of the batch's).
        max_grad_norm: Clip the gradient norm before each step (None: no clipping).
        format_weight: Reward for giving a `#### <answer>` line, added to the verifier's score.
        answer_extraction: What the verifier scores: "marked" (the text after the last `#### `) or
            "last_number" (the last number of the completion; see `rewards.py`).
        completions_to_log: Sampled completions shown in TensorBoard's text tab (0: none).
        completions_log_every_n_steps: How often they are shown.
        **kwargs: Model, tokenizer, generation and adapter settings of `ReasoningTask`.
    """

    def __init__(
        self,
        data: VerifiedPrompts | None = None,
        group_size: int = 8,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        loss_type: LossType = "grpo",
        scale_rewards: bool | None = None,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        beta: float = 0.0,
        inner_updates: int = 1,
        micro_batch_size: int | None = None,
        max_grad_norm: float | None = 1.0,
        format_weight: float = 0.0,
        answer_extraction: AnswerExtraction = "marked",
        completions_to_log: int = 4,
        completions_log_every_n_steps: int = 10,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        checks = {
            "group_size": (group_size >= 2, "at least 2 (a group of one has no advantage)"),
            "temperature": (temperature > 0, "positive"),
            "top_p": (0 < top_p <= 1, "in (0, 1]"),
            "inner_updates": (inner_updates >= 1, "at least 1"),
            "micro_batch_size": (micro_batch_size is None or micro_batch_size >= 1, "at least 1"),
            "epsilon": (0 < epsilon < 1, "in (0, 1)"),
            "beta": (beta >= 0, "0 or more"),
        }
        for name, (ok, expected) in checks.items():
            if not ok:
                raise UserInputError(f"GRPOTask {name}={locals()[name]!r}; expected {expected}")
        if data is not None and not isinstance(data, VerifiedPrompts):
            raise UserInputError(
                f"GRPOTask scores completions with verifiers, but its data is a {type(data).__name__}; "
                "use lightning_moe.data.verified_prompts.VerifiedPrompts"
            )
        self.automatic_optimization = False  # several updates per rollout, micro-batched
        self.data = data
        self.group_size = group_size
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.loss_type = loss_type
        self.scale_rewards = loss_type == "grpo" if scale_rewards is None else scale_rewards
        self.epsilon = epsilon
        self.epsilon_high = epsilon if epsilon_high is None else epsilon_high
        self.beta = beta
        self.inner_updates = inner_updates
        self.micro_batch_size = micro_batch_size
        self.max_grad_norm = max_grad_norm
        self.format_weight = format_weight
        self.answer_extraction = answer_extraction
        self.completions_to_log = completions_to_log
        self.completions_log_every_n_steps = completions_log_every_n_steps
        self.verifier_scores = torch.nn.ModuleDict({stage: MeanMetric() for stage in ("val", "test")})

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            self.check_verifiers()

    def check_verifiers(self) -> None:
        """Before training: each task's verifier must give full reward to its own reference
        answer in the asked-for format, or no completion could earn it."""
        if self.data is None:
            raise UserInputError("GRPOTask needs its data module (`data`) for the verifiers")
        first = {}
        for example in self.data.splits["train"]:
            first.setdefault(example.domain, example)
        examples = list(first.values())
        rewards = score_completions(
            [f"{ANSWER_MARKER}{example.entry['answer']}" for example in examples],
            [example.domain for example in examples],
            [example.entry for example in examples],
            [example.prompt_text for example in examples],
            self.data.verifier(),
            0.0,
            self.answer_extraction,
        )
        for example, reward in zip(examples, rewards.correct.tolist(), strict=True):
            if reward != 1.0:
                raise UserInputError(
                    f"the verifier of task {example.domain!r} gives {reward:g} to its own reference answer "
                    f"{example.entry['answer']!r} written as '{ANSWER_MARKER}<answer>' and read as "
                    f"answer_extraction={self.answer_extraction!r}; use a task whose answers it reads whole"
                )

    # --- sampling --------------------------------------------------------------------------
    def sampling_seed(self) -> int:
        """A function of the run's seed, this step and this process: a resumed run samples alike."""
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        return (seed * 1_000_003 + self.global_step * 7_919 + self.global_rank) % (2**63)

    def sampling_config(self) -> GenerationConfig:
        tokenizer = self.tokenizer
        return GenerationConfig(
            do_sample=True,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )

    @torch.no_grad()
    def sample(self, prompt_ids: Tensor, prompt_mask: Tensor) -> Tensor:
        """Completions [N, <= max_new_tokens] of left-padded prompts, with this step's seed."""
        training = self.model.training
        self.model.eval()  # no dropout while sampling
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.sampling_seed())
                tokens = self.model.generate(
                    input_ids=prompt_ids,
                    attention_mask=prompt_mask,
                    generation_config=self.sampling_config(),
                    # sharded weights: every process runs forwards until all have finished
                    synced_gpus=self.device_mesh is not None and self.trainer.world_size > 1,
                )
        finally:
            self.model.train(training)
        return tokens[:, prompt_ids.shape[1] :]

    # --- the rollout -----------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, batch: dict) -> dict:
        """Sample, score and prepare a batch of prompts: everything the updates need, per completion."""
        group = self.group_size
        prompt_ids = batch["prompt_ids"].repeat_interleave(group, 0)
        prompt_mask = batch["prompt_mask"].repeat_interleave(group, 0)
        completions = self.sample(prompt_ids, prompt_mask)
        mask = completion_mask(completions, self.tokenizer.eos_token_id)
        lengths = mask.sum(1).tolist()
        texts = self.tokenizer.batch_decode(
            [row[:length] for row, length in zip(completions.tolist(), lengths, strict=True)],
            skip_special_tokens=True,
        )

        def repeat(values: list) -> list:  # one per completion
            return [value for value in values for _ in range(group)]

        rewards = score_completions(
            texts,
            repeat(batch["domain"]),
            repeat(batch["entry"]),
            repeat(batch["prompt_text"]),
            self.data.verifier(),
            self.format_weight,
            self.answer_extraction,
        )
        advantages, equal_groups = group_advantages(rewards.total, group, self.scale_rewards)
        attention_mask = torch.cat([prompt_mask, mask], dim=1)
        rollout = {
            "input_ids": torch.cat([prompt_ids, completions], dim=1),
            "attention_mask": attention_mask,
            "position_ids": (attention_mask.cumsum(1) - 1).clamp(min=0),
            "completion": completions,
            "completion_mask": mask,
            "advantages": advantages.to(self.device),
            "domain": repeat(batch["domain"]),
        }
        if self.inner_updates > 1:  # the sampling policy's log-probs, before the first update moves it
            rollout["old_log_probs"] = self.log_probs_of(rollout)
        if self.beta:
            with adapters_disabled(self.model):
                rollout["ref_log_probs"] = self.log_probs_of(rollout)
        rollout["texts"], rollout["rewards"], rollout["equal_groups"] = texts, rewards, equal_groups
        rollout["prompt_text"] = repeat(batch["prompt_text"])
        return rollout

    def forward_completions(self, chunk: dict) -> tuple[Tensor, Tensor]:
        """Log-probs and entropies [n, C] of a chunk's completion tokens under the current model."""
        length = chunk["completion"].shape[1]
        logits = self.model(
            input_ids=chunk["input_ids"],
            attention_mask=chunk["attention_mask"],
            position_ids=chunk["position_ids"],
            logits_to_keep=length + 1,  # position i predicts token i + 1: the last one predicts nothing
        ).logits[:, :-1]
        return completion_log_probs(logits, chunk["completion"], self.temperature)

    def log_probs_of(self, rollout: dict) -> Tensor:
        return torch.cat([self.forward_completions(chunk)[0] for chunk in self.chunks(rollout)])

    def chunks(self, rollout: dict) -> list[dict]:
        """The rollout in micro-batches of completions, each with its share of the whole batch."""
        total = rollout["input_ids"].shape[0]
        size = self.micro_batch_size or total
        keys = [k for k, v in rollout.items() if isinstance(v, Tensor) and v.shape[:1] == (total,)]
        return [
            {key: rollout[key][start : start + size] for key in keys}
            | {"domain": rollout["domain"][start : start + size], "share": min(size, total - start) / total}
            for start in range(0, total, size)
        ]

    # --- the update ------------------------------------------------------------------------
    def task_loss(self, chunk: dict) -> tuple[Tensor, Tensor]:
        if "advantages" not in chunk:  # an evaluation batch: the reference solutions' loss
            return super().task_loss(chunk)
        log_probs, entropy = self.forward_completions(chunk)
        parts = policy_loss(
            log_probs,
            chunk.get("old_log_probs", log_probs.detach()),
            chunk["advantages"],
            chunk["completion_mask"],
            self.loss_type,
            self.max_new_tokens,
            self.epsilon,
            self.epsilon_high,
            self.beta,
            chunk.get("ref_log_probs"),
        )
        # the statistics travel with the chunk (loss_terms returns only the terms)
        chunk["parts"], chunk["entropy_sum"] = parts, (entropy.detach() * chunk["completion_mask"]).sum()
        return parts.loss, chunk["attention_mask"]

    def update(self, rollout: dict) -> dict[str, float]:
        """One optimizer step over the whole rollout; the summed loss terms and token statistics."""
        optimizer = self.optimizers()
        optimizer.zero_grad()
        totals: dict[str, float] = {}
        tokens = kl = clipped = entropy = 0.0
        for chunk in self.chunks(rollout):
            terms, _ = self.loss_terms(chunk)
            stop_on_non_finite_terms(self, {name: value for name, (_, value) in terms.items()})
            loss = chunk["share"] * sum(coefficient * value for coefficient, value in terms.values())
            self.manual_backward(loss)
            for name, (_, value) in terms.items():
                totals[name] = totals.get(name, 0.0) + chunk["share"] * float(value.detach())
            totals["loss"] = totals.get("loss", 0.0) + float(loss.detach())
            parts: PolicyLossParts = chunk["parts"]
            tokens += float(parts.tokens)
            kl, clipped = kl + float(parts.kl_sum), clipped + float(parts.clipped_sum)
            entropy += float(chunk["entropy_sum"])
        if self.max_grad_norm is not None:
            trainable = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(trainable, self.max_grad_norm)
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        tokens = max(tokens, 1.0)
        return totals | {"kl": kl / tokens, "clip_fraction": clipped / tokens, "entropy": entropy / tokens}

    def training_step(self, batch: dict, batch_idx: int) -> None:
        show = self.completions_to_log > 0 and self.global_step % self.completions_log_every_n_steps == 0
        rollout = self.rollout(batch)
        for _ in range(self.inner_updates):
            step = self.update(rollout)
        self.log_rollout(rollout, step, len(batch["domain"]))
        if show:
            self.log_completions(rollout)

    # --- what a user sees ------------------------------------------------------------------
    def log_rollout(self, rollout: dict, step: dict[str, float], prompts: int) -> None:
        rewards = rollout["rewards"]
        lengths = rollout["completion_mask"].sum(1).float()
        values = {f"train/{name}": value for name, value in step.items() if name != "task_loss"} | {
            "train/reward_std": rewards.total.std() if len(rewards.total) > 1 else torch.tensor(0.0),
            "train/accuracy": (rewards.correct == 1).float().mean(),
            "train/format_rate": rewards.formatted.mean(),
            "train/completion_length": lengths.mean(),
            "train/equal_reward_groups": rollout["equal_groups"].float().mean(),
        }
        self.log_dict(
            {k: torch.as_tensor(v, dtype=torch.float32) for k, v in values.items()}, batch_size=prompts
        )
        self.log("train/task_loss", step["task_loss"], prog_bar=True, batch_size=prompts)
        self.log("train/reward", rewards.total.mean(), prog_bar=True, batch_size=prompts)

    def log_completions(self, rollout: dict) -> None:
        """The rollout's first completions with their rewards, as a TensorBoard text table."""
        rewards = rollout["rewards"]
        shown = zip(rollout["prompt_text"], rollout["texts"], rewards.total, rewards.correct, strict=True)
        rows = [
            [prompt[-200:], text.strip()[:300], f"{float(total):.2f}", f"{float(correct):.2f}"]
            for prompt, text, total, correct in list(shown)[: self.completions_to_log]
        ]
        table = markdown_table(["prompt", "completion", "reward", "verifier"], rows)
        add_text(self.logger, "train/completions", table, self.global_step)

    def tensorboard_layout(self) -> dict[str, dict[str, list[str]]]:
        return {
            "GRPO": {
                "reward": ["train/reward$", "train/reward_std"],
                "accuracy and format": ["train/accuracy", "train/format_rate", "val/verifier_score"],
                "policy": ["train/kl", "train/clip_fraction", "train/entropy"],
                "groups without signal": ["train/equal_reward_groups"],
                "completion length": ["train/completion_length"],
            }
        }

    # --- evaluation: ReasoningTask's greedy scores plus the verifier's ------------------------
    def _score(self, batch: dict, batch_idx: int, stage: str) -> list[str]:
        outputs = super()._score(batch, batch_idx, stage)
        rewards = score_completions(
            outputs,
            batch["domain"],
            batch["entry"],
            batch["prompt_text"],
            self.data.verifier(),
            0.0,
            self.answer_extraction,
        )
        metric = self.verifier_scores[stage]
        metric.update(rewards.correct.to(self.device))
        self.log(f"{stage}/verifier_score", metric, on_step=False, on_epoch=True, batch_size=len(outputs))
        return outputs

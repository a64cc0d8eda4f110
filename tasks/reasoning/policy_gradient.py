"""The maths of GRPO and Dr. GRPO, as plain functions of tensors (no model, no Lightning).

- Advantages (`group_advantages`): each completion's reward minus its group's mean; GRPO also
  divides by the group's standard deviation (Shao et al. 2024), Dr. GRPO does not (Liu et al.
  2025, "Understanding R1-Zero-Like Training": the division weights easy and hard prompts unevenly).
- Per-token objective (`policy_loss`): the clipped importance ratio of PPO against the rollout's
  log-probs, min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), minus beta times the k3 estimate of
  KL(policy || reference), exp(ref - logp) - (ref - logp) - 1, as TRL's GRPOTrainer computes it.
- Aggregation over tokens: GRPO averages each completion's tokens, then the completions, so a
  token of a short completion weighs more; Dr. GRPO sums every token and divides by a constant
  (completions x max_new_tokens), so no length is favoured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

LossType = Literal["grpo", "dr_grpo"]


def group_advantages(rewards: Tensor, group_size: int, scale: bool) -> tuple[Tensor, Tensor]:
    """Advantages [N] of rewards [N] laid out group by group (G consecutive completions of one
    prompt), and which groups had all-equal rewards [N / G] (no signal: their advantages are 0).

    `scale` divides by the group's (unbiased) standard deviation plus 1e-4, as TRL does."""
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred[:, :1])
    advantages = centred / (std + 1e-4) if scale else centred
    return advantages.flatten(), (groups == groups[:, :1]).all(dim=1)


def completion_log_probs(logits: Tensor, tokens: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Log-probabilities [N, C] of `tokens` [N, C] under logits [N, C, V] at sampling temperature
    `temperature` (the distribution the tokens were drawn from), and each position's entropy."""
    log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
    chosen = log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return chosen, entropy


@dataclass
class PolicyLossParts:
    """The loss and the token-level statistics the task logs (sums over the real tokens, so that
    chunks of one rollout add up)."""

    loss: Tensor
    tokens: Tensor
    kl_sum: Tensor
    clipped_sum: Tensor


def policy_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    loss_type: LossType,
    max_new_tokens: int,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    ref_log_probs: Tensor | None = None,
) -> PolicyLossParts:
    """The GRPO / Dr. GRPO loss of completions [N, C] with real-token `mask` [N, C] (see the module
    docstring); `ref_log_probs` is needed when beta > 0."""
    mask = mask.to(log_probs.dtype)
    ratio = torch.exp(log_probs - old_log_probs)
    advantage = advantages.unsqueeze(1)
    clipped_ratio = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
    objective = torch.minimum(ratio * advantage, clipped_ratio * advantage)
    # clipped: where the clip, not the ratio, sets the objective (no gradient flows there)
    clipped = ((ratio < 1 - epsilon_low) & (advantage < 0)) | ((ratio > 1 + epsilon_high) & (advantage > 0))
    per_token = -objective
    kl = torch.zeros_like(per_token)
    if beta:
        if ref_log_probs is None:
            raise ValueError("beta > 0 needs the reference policy's log-probs")
        gap = ref_log_probs - log_probs
        kl = torch.exp(gap) - gap - 1
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    else:
        loss = (per_token * mask).sum() / (per_token.shape[0] * max_new_tokens)
    return PolicyLossParts(loss, mask.sum(), (kl * mask).sum().detach(), (clipped * mask).sum().detach())

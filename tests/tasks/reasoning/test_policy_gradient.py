"""GRPO and Dr. GRPO maths against their formulas, on hand-made tensors."""

import pytest
import torch

from lightning_moe.tasks.reasoning.grpo import completion_mask
from lightning_moe.tasks.reasoning.policy_gradient import (
    completion_log_probs,
    group_advantages,
    policy_loss,
)


def test_group_advantages_follow_grpo_and_dr_grpo():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    scaled, equal = group_advantages(rewards, 4, scale=True)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()  # unbiased, as TRL takes it
    assert torch.allclose(scaled[:4], (rewards[:4] - 0.5) / (std + 1e-4))
    assert torch.equal(scaled[4:], torch.zeros(4)) and equal.tolist() == [False, True]
    centred, _ = group_advantages(rewards, 4, scale=False)
    assert torch.equal(centred, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))


def test_completion_log_probs_are_the_tempered_softmax():
    logits = torch.randn(2, 3, 5, dtype=torch.float64)
    tokens = torch.randint(0, 5, (2, 3))
    chosen, entropy = completion_log_probs(logits, tokens, temperature=0.7)
    probs = torch.softmax(logits / 0.7, -1)
    assert torch.allclose(chosen, probs.gather(-1, tokens[..., None]).squeeze(-1).log().float())
    assert torch.allclose(entropy, -(probs * probs.log()).sum(-1).float())


def test_completion_mask_stops_after_the_first_end_token():
    completions = torch.tensor([[5, 2, 9, 2], [5, 6, 7, 8]])
    assert completion_mask(completions, eos_token_id=2).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def _leaf(values):
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo"])
def test_at_ratio_one_the_gradient_is_the_policy_gradient(loss_type):
    """With old = current log-probs, d loss / d logp_t = -A_i / |o_i| / N (GRPO) or
    -A_i / (N * max_new_tokens) (Dr. GRPO) on every real token, 0 on padding."""
    log_probs = _leaf([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages = torch.tensor([0.8, -1.2], dtype=torch.float64)
    parts = policy_loss(log_probs, log_probs.detach(), advantages, mask, loss_type, max_new_tokens=4)
    parts.loss.backward()
    lengths = torch.tensor([3.0, 2.0], dtype=torch.float64)
    scale = 2 * lengths if loss_type == "grpo" else torch.full((2,), 2 * 4.0, dtype=torch.float64)
    expected = (-advantages / scale)[:, None] * mask
    assert torch.allclose(log_probs.grad, expected)
    # ratio 1: the objective is A on every real token, aggregated the same way
    expected_loss = -(advantages * lengths / (scale / 2)).sum() / 2
    assert parts.loss.item() == pytest.approx(float(expected_loss))
    assert parts.tokens == 5 and parts.clipped_sum == 0


def test_the_clip_stops_the_gradient_only_on_the_side_it_binds():
    old = torch.zeros(1, 4, dtype=torch.float64)
    # ratios e^0.5 (above 1 + eps) and e^-0.5 (below 1 - eps), with a positive and a negative advantage
    log_probs = _leaf([[0.5, -0.5, 0.5, -0.5]])
    mask = torch.ones(1, 4)
    for advantage, clipped_tokens in ((1.0, [0, 2]), (-1.0, [1, 3])):
        log_probs.grad = None
        parts = policy_loss(log_probs, old, torch.tensor([advantage]), mask, "dr_grpo", max_new_tokens=4)
        parts.loss.backward()
        zero = log_probs.grad[0] == 0
        assert zero.nonzero().flatten().tolist() == clipped_tokens
        assert parts.clipped_sum == 2


def test_kl_is_the_k3_estimator_and_vanishes_at_the_reference():
    log_probs = _leaf([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -2.0]], dtype=torch.float64)
    mask = torch.ones(1, 2)
    parts = policy_loss(
        log_probs, log_probs.detach(), torch.zeros(1), mask, "grpo", 2, beta=0.1, ref_log_probs=ref
    )
    gap = ref - log_probs.detach()
    k3 = torch.exp(gap) - gap - 1
    assert parts.kl_sum.item() == pytest.approx(float(k3.sum()))
    assert k3[0, 1] == 0 and k3[0, 0] > 0
    assert parts.loss.item() == pytest.approx(0.1 * float(k3.mean()))  # advantage 0: the KL alone
    with pytest.raises(ValueError, match="reference"):
        policy_loss(log_probs, log_probs.detach(), torch.zeros(1), mask, "grpo", 2, beta=0.1)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo"])
def test_chunks_weighted_by_their_share_add_up_to_the_whole_batch(loss_type):
    torch.manual_seed(0)
    log_probs = torch.randn(6, 5, dtype=torch.float64)
    old = log_probs + 0.3 * torch.randn(6, 5, dtype=torch.float64)
    advantages = torch.randn(6, dtype=torch.float64)
    mask = (torch.rand(6, 5) > 0.3).long()
    mask[:, 0] = 1
    whole = policy_loss(log_probs, old, advantages, mask, loss_type, 5).loss
    chunked = sum(
        ((rows.stop - rows.start) / 6)
        * policy_loss(log_probs[rows], old[rows], advantages[rows], mask[rows], loss_type, 5).loss
        for rows in (slice(0, 4), slice(4, 6))
    )
    assert torch.allclose(chunked, whole)

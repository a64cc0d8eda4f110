"""LoRA-Pro and ALLoRA against dense references written out from the papers' formulas."""

import pytest
import torch
from torch import nn

from lightning_moe.adapters import AdapterRule, inject
from lightning_moe.adapters.lora import LoraConfig
from lightning_moe.adapters.moe import MoEConfig
from lightning_moe.errors import UserInputError
from lightning_moe.lora_optimizers import ALLoRA, LoraPro, adjusted_gradients, low_rank_pairs

S = 2.0


def lora_model(seed=0, **options):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(7, 6)).double()
    config = LoraConfig(rank=3, alpha=options.pop("alpha", 6.0), **options)
    inject(model, [AdapterRule(targets=["0"], adapter=config)])
    with torch.no_grad():
        model[0].adapter.lora_B.normal_()
    return model


def projections(A, B):
    P_B = B @ torch.linalg.inv(B.T @ B) @ B.T
    P_A = A.T @ torch.linalg.inv(A @ A.T) @ A
    return P_B, P_A


def sylvester_by_kronecker(P, Q, C):
    """X with P X + X Q = C through the vectorised system (an independent solver)."""
    r, c = C.shape
    system = torch.kron(torch.eye(c, dtype=C.dtype), P.contiguous()) + torch.kron(
        Q.T.contiguous(), torch.eye(r, dtype=C.dtype)
    )
    return torch.linalg.solve(system, C.mT.reshape(-1)).reshape(c, r).mT


def reference_pair_gradients(A, B, G, s):
    """The paper's closed form from the full gradient G, with X from the Kronecker solve."""
    gA, gB = s * B.T @ G, s * G @ A.T
    BtB_inv, AAt_inv = torch.linalg.inv(B.T @ B), torch.linalg.inv(A @ A.T)
    X = sylvester_by_kronecker(B.T @ B, A @ A.T, -BtB_inv @ gA @ A.T / s**2)
    eye = torch.eye(B.shape[0], dtype=B.dtype)
    return BtB_inv @ gA / s**2 + X @ A, (eye - B @ BtB_inv @ B.T) @ gB @ AAt_inv / s**2 - B @ X


def test_adjusted_gradients_give_the_best_approximation_of_the_full_gradient():
    generator = torch.Generator().manual_seed(0)
    A, B, G = (
        torch.randn(*shape, generator=generator, dtype=torch.float64) for shape in ((3, 7), (6, 3), (6, 7))
    )
    new_gA, new_gB = adjusted_gradients(A, B, S * B.T @ G, S * G @ A.T, S)
    P_B, P_A = projections(A, B)
    # the equivalent gradient is G projected onto the reachable directions (Theorem 2.1); the
    # tolerance is that of the 1e-8 damping of the inverses
    torch.testing.assert_close(
        S * (B @ new_gA + new_gB @ A), P_B @ G + (G - P_B @ G) @ P_A, rtol=1e-5, atol=1e-7
    )
    reference_A, reference_B = reference_pair_gradients(A, B, G, S)
    torch.testing.assert_close(new_gA, reference_A, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(new_gB, reference_B, rtol=1e-6, atol=1e-9)


def test_lora_pro_steps_match_a_dense_adamw_reference():
    model = lora_model()
    adapter = model[0].adapter
    optimizer = LoraPro(adapter.parameters(), lr=1e-2, weight_decay=0.1)
    optimizer.bind_low_rank_pairs(low_rank_pairs(model))
    A, B = adapter.lora_A.detach().clone(), adapter.lora_B.detach().clone()
    W0 = model[0].base_layer.weight.detach()
    m = v = torch.zeros(6, 7, dtype=torch.float64)
    generator = torch.Generator().manual_seed(1)
    for step in range(1, 4):
        x, y = (
            torch.randn(5, 7, generator=generator, dtype=torch.float64),
            torch.randn(5, 6, generator=generator, dtype=torch.float64),
        )
        optimizer.zero_grad()
        (model(x) - y).square().sum().backward()
        optimizer.step()
        # dense reference: the full gradient of W = W0 + s B A, projected, through Adam, back to (A, B)
        W = (W0 + S * B @ A).requires_grad_(True)
        (x @ W.T + model[0].base_layer.bias.detach() - y).square().sum().backward()
        P_B, P_A = projections(A, B)
        equivalent = P_B @ W.grad + (W.grad - P_B @ W.grad) @ P_A
        m, v = 0.9 * m + 0.1 * equivalent, 0.999 * v + 0.001 * equivalent.square()
        u = (m / (1 - 0.9**step)) / ((v / (1 - 0.999**step)).sqrt() + 1e-8)
        gA, gB = reference_pair_gradients(A, B, u, S)
        A, B = A * (1 - 1e-2 * 0.1) - 1e-2 * gA, B * (1 - 1e-2 * 0.1) - 1e-2 * gB
        torch.testing.assert_close(adapter.lora_A.detach(), A, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(adapter.lora_B.detach(), B, rtol=1e-6, atol=1e-9)


def test_lora_pro_treats_every_expert_as_its_own_pair():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 6)).double()
    inject(model, [AdapterRule(targets=["0"], adapter=MoEConfig(rank=2, alpha=4.0, num_experts=3, top_k=1))])
    experts = model[0].adapter.experts
    with torch.no_grad():
        experts.lora_B.normal_()
    optimizer = LoraPro(model[0].adapter.parameters(), lr=1e-2)
    optimizer.bind_low_rank_pairs(low_rank_pairs(model))
    model(torch.randn(16, 7, dtype=torch.float64)).square().sum().backward()
    A, B = experts.lora_A.detach().clone(), experts.lora_B.detach().clone()
    gA, gB = experts.lora_A.grad.clone(), experts.lora_B.grad.clone()
    optimizer.step()
    for e in range(3):  # the first Adam step of each expert's own equivalent gradient
        new_gA, new_gB = adjusted_gradients(A[e], B[e], gA[e], gB[e], experts.scaling)
        equivalent = experts.scaling * (B[e] @ new_gA + new_gB @ A[e])
        u = equivalent / (equivalent.abs() + 1e-8)
        expected_A, _ = adjusted_gradients(
            A[e], B[e], experts.scaling * B[e].T @ u, experts.scaling * u @ A[e].T, experts.scaling
        )
        torch.testing.assert_close(experts.lora_A[e].detach(), A[e] - 1e-2 * expected_A, rtol=1e-6, atol=1e-9)


def test_allora_scales_each_row_by_its_norm_and_refuses_dropout_and_scaling():
    model = lora_model(alpha=3.0)  # scaling 1
    adapter = model[0].adapter
    optimizer = ALLoRA(adapter.parameters(), lr=1e-2, eta=0.5)
    optimizer.bind_low_rank_pairs(low_rank_pairs(model))
    before = {name: p.detach().clone() for name, p in adapter.named_parameters()}
    model(torch.randn(5, 7, dtype=torch.float64)).square().sum().backward()
    grads = {name: p.grad.clone() for name, p in adapter.named_parameters()}
    optimizer.step()
    for name, parameter in adapter.named_parameters():  # first AdamW step: lr * rate_i * sign(g)
        rate = (1 + before[name].norm(dim=-1, keepdim=True).square() / 0.25).rsqrt()
        expected = before[name] - 1e-2 * rate * grads[name] / (grads[name].abs() + 1e-8)
        torch.testing.assert_close(parameter.detach(), expected, rtol=1e-6, atol=1e-9)
    for options, message in (({"alpha": 6.0}, "scaling=2"), ({"alpha": 3.0, "dropout": 0.1}, "dropout=0.1")):
        bad = lora_model(**options)
        with pytest.raises(
            UserInputError, match=f"ALLoRA trains LoRA without dropout and without scaling.*{message}"
        ):
            ALLoRA(bad.parameters()).bind_low_rank_pairs(low_rank_pairs(bad))


def test_kinds_without_factor_pairs_are_refused():
    model = nn.Sequential(nn.Linear(7, 6))
    inject(model, [AdapterRule(targets=["0"], adapter={"kind": "codyra", "rank": 2})])
    with pytest.raises(
        UserInputError,
        match="LoRA-Pro and ALLoRA adjust plain LoRA and MoE experts; layer '0' has a 'codyra'",
    ):
        low_rank_pairs(model)

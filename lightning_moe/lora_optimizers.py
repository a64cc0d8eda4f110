"""Optimisers that know which parameters are LoRA factor pairs: LoRA-Pro and ALLoRA.

Both are AdamW for every parameter that is not a factor pair (routers, projectors). The task
hands them the pairs after building them (`TaskModule.configure_optimizers` calls
`bind_low_rank_pairs` with each adapter's `low_rank_factors()`: plain LoRA's (A, B, scaling),
and every expert of a MoE bank as its own pair), so a YAML `optimizer:` entry is all it takes:

    optimizer: {class_path: lightning_moe.lora_optimizers.LoraPro, init_args: {lr: 1e-3}}

- **LoRA-Pro** (Wang & Liang, 2024). With W = W0 + s B A, the LoRA gradients g_A = s B^T G and
  g_B = s G A^T give the equivalent full-weight gradient g~ = s (B g_A' + g_B' A) of any adjusted
  pair (g_A', g_B'). The closed form that makes g~ the closest to G is
  g_A' = (B^T B)^-1 g_A / s^2 + X A and g_B' = [I - B (B^T B)^-1 B^T] g_B (A A^T)^-1 / s^2 - B X;
  X (any r x r leaves g~ unchanged) is the solution of the Sylvester equation
  (B^T B) X + X (A A^T) = -(B^T B)^-1 g_A A^T / s^2, which keeps the pair closest to the LoRA
  gradients. With Adam, as in the paper, the moments are kept of g~ itself (one [out, in] pair
  per layer: full fine-tuning's optimiser memory), the Adam direction u is computed in the full
  space and mapped back to (A, B) by the same closed form with G = u. Inverses are damped by 1e-8.
- **ALLoRA** (Huang & Balestriero, 2024): LoRA without dropout and without the alpha / r scaling
  (it refuses adapters that have either), whose learning rate is adaptive per row: every row
  theta_i of A and of B takes the step lr / sqrt(1 + ||theta_i||^2 / eta^2) of AdamW's update, so
  rows near zero move at the full rate and large rows slow down in inverse proportion to their
  norm. The abstract states the principle ("a coefficient inversely proportional to the
  parameters' l2 norm"); this form is our reading of it, see docs/inits.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from lightning_moe.errors import UserInputError

DAMPING = 1e-8


@dataclass
class LowRankPair:
    """One layer's factors: A [..., r, in], B [..., out, r] (leading dims: experts), scaling s."""

    name: str
    lora_A: nn.Parameter
    lora_B: nn.Parameter
    scaling: float
    dropout: float


def low_rank_pairs(model: nn.Module) -> list[LowRankPair]:
    """The factor pairs of every adapted layer whose kind has them; any other trainable adapter
    kind is one error (these optimisers would silently treat it as plain AdamW)."""
    from lightning_moe.adapters import adapted_layers

    pairs = []
    for name, layer in adapted_layers(model):
        factors = getattr(layer.adapter, "low_rank_factors", None)
        if factors is None:
            if any(p.requires_grad for p in layer.adapter.parameters()):
                raise UserInputError(
                    f"LoRA-Pro and ALLoRA adjust plain LoRA and MoE experts; layer {name!r} has a "
                    f"{layer.config.kind!r} adapter"
                )
            continue
        lora_A, lora_B, scaling = factors()
        pairs.append(LowRankPair(name, lora_A, lora_B, scaling, getattr(layer.config, "dropout", 0.0)))
    return pairs


class _LowRankAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) for every parameter; subclasses step the bound pairs."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if not lr > 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1 or eps <= 0 or weight_decay < 0:
            raise ValueError(f"lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.pairs: list[LowRankPair] = []

    def bind_low_rank_pairs(self, pairs: list[LowRankPair]) -> None:
        owned = {id(p) for group in self.param_groups for p in group["params"]}
        self.pairs = [pair for pair in pairs if id(pair.lora_A) in owned and id(pair.lora_B) in owned]
        if not self.pairs:
            raise UserInputError(
                f"{type(self).__name__} found no LoRA factor pairs among the parameters it trains"
            )

    def _group_of(self, parameter: Tensor) -> dict:
        return next(g for g in self.param_groups if any(p is parameter for p in g["params"]))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        paired = set()
        for pair in self.pairs:
            if pair.lora_A.grad is None or pair.lora_B.grad is None:
                continue
            self.step_pair(pair, self._group_of(pair.lora_A))
            paired |= {id(pair.lora_A), id(pair.lora_B)}
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is not None and id(parameter) not in paired:
                    direction = self._adam_direction(parameter, parameter.grad, group)
                    _apply(parameter, direction, group["lr"], group["weight_decay"])
        return loss

    def step_pair(self, pair: LowRankPair, group: dict) -> None:
        raise NotImplementedError

    def _adam_direction(self, key: Tensor, gradient: Tensor, group: dict) -> Tensor:
        """Bias-corrected m / (sqrt(v) + eps) of `gradient`, the moments kept under `key`."""
        state = self.state[key]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(gradient)
            state["exp_avg_sq"] = torch.zeros_like(gradient)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        step = state["step"]
        state["exp_avg"].mul_(beta1).add_(gradient, alpha=1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(gradient, gradient, value=1 - beta2)
        denominator = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt_().add_(group["eps"])
        return state["exp_avg"] / (1 - beta1**step) / denominator


def _apply(parameter: Tensor, direction: Tensor, lr: float | Tensor, weight_decay: float) -> None:
    """AdamW's update: decoupled decay, then the step (a sharded parameter takes its own slice)."""
    if isinstance(parameter, DTensor) and not isinstance(direction, DTensor):
        direction = distribute_tensor(direction, parameter.device_mesh, parameter.placements)
    if weight_decay:
        parameter.sub_(lr * weight_decay * parameter)
    parameter.sub_(lr * direction.to(parameter.dtype))


def _whole(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """A factor or gradient as one local tensor (gathered when sharded), in the compute dtype."""
    tensor = tensor.detach()
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).to(dtype)


class LoraPro(_LowRankAdamW):
    """LoRA-Pro with AdamW (see the module docstring). Args as torch.optim.AdamW."""

    def step_pair(self, pair: LowRankPair, group: dict) -> None:
        dtype = torch.promote_types(pair.lora_A.dtype, torch.float32)
        A, B = _whole(pair.lora_A, dtype), _whole(pair.lora_B, dtype)
        gA, gB = _whole(pair.lora_A.grad, dtype), _whole(pair.lora_B.grad, dtype)
        s = pair.scaling
        equivalent = equivalent_gradient(A, B, gA, gB, s)
        # the moments live under lora_A's state (one [..., out, in] pair per layer); lora_B's state
        # keeps the step, so every trained parameter has state (sharded checkpoints expect it)
        direction = self._adam_direction(pair.lora_A, equivalent, group)
        self.state[pair.lora_B]["step"] = self.state[pair.lora_A]["step"]
        new_gA, new_gB = adjusted_gradients(A, B, s * B.mT @ direction, s * direction @ A.mT, s)
        _apply(pair.lora_A, new_gA, group["lr"], group["weight_decay"])
        _apply(pair.lora_B, new_gB, group["lr"], group["weight_decay"])


def _damped_inverse(matrix: Tensor) -> Tensor:
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    return torch.linalg.pinv(matrix + DAMPING * eye)


def adjusted_gradients(A: Tensor, B: Tensor, gA: Tensor, gB: Tensor, s: float) -> tuple[Tensor, Tensor]:
    """LoRA-Pro's (g_A', g_B') from the LoRA gradients (batched over leading dims)."""
    BtB, AAt = B.mT @ B, A @ A.mT
    BtB_inv, AAt_inv = _damped_inverse(BtB), _damped_inverse(AAt)
    eye = torch.eye(B.shape[-2], dtype=B.dtype, device=B.device)
    X = solve_sylvester(BtB, AAt, -(BtB_inv @ gA @ A.mT) / s**2)
    new_gA = BtB_inv @ gA / s**2 + X @ A
    new_gB = (eye - B @ BtB_inv @ B.mT) @ gB @ AAt_inv / s**2 - B @ X
    return new_gA, new_gB


def equivalent_gradient(A: Tensor, B: Tensor, gA: Tensor, gB: Tensor, s: float) -> Tensor:
    """s (B g_A' + g_B' A) of the adjusted gradients, from the LoRA gradients alone."""
    new_gA, new_gB = adjusted_gradients(A, B, gA, gB, s)
    return s * (B @ new_gA + new_gB @ A)


def solve_sylvester(P: Tensor, Q: Tensor, C: Tensor) -> Tensor:
    """X with P X + X Q = C for symmetric positive semi-definite P, Q (both eigendecomposed;
    a damped denominator where both are singular)."""
    lam, U = torch.linalg.eigh(P)
    mu, V = torch.linalg.eigh(Q)
    Y = (U.mT @ C @ V) / (lam[..., :, None] + mu[..., None, :] + DAMPING)
    return U @ Y @ V.mT


class ALLoRA(_LowRankAdamW):
    """ALLoRA (see the module docstring). Args as torch.optim.AdamW, plus `eta`: the row norm at
    which a row's learning rate has fallen to 1/sqrt(2) of `lr`."""

    def __init__(self, params: Iterable, lr: float = 1e-3, eta: float = 1.0, **adamw) -> None:
        if eta <= 0:
            raise ValueError(f"eta must be > 0, got eta={eta}")
        super().__init__(params, lr=lr, **adamw)
        self.eta = eta

    def bind_low_rank_pairs(self, pairs: list[LowRankPair]) -> None:
        for pair in pairs:
            if pair.dropout != 0 or pair.scaling != 1.0:
                raise UserInputError(
                    f"ALLoRA trains LoRA without dropout and without scaling; layer {pair.name!r} has "
                    f"dropout={pair.dropout} and scaling={pair.scaling:g} (set dropout: 0 and alpha equal to rank)"
                )
        super().bind_low_rank_pairs(pairs)

    def step_pair(self, pair: LowRankPair, group: dict) -> None:
        for parameter in (pair.lora_A, pair.lora_B):
            direction = self._adam_direction(parameter, parameter.grad, group)
            _apply(parameter, direction, group["lr"] * self.row_rates(parameter), group["weight_decay"])

    def row_rates(self, parameter: Tensor) -> Tensor:
        """Each row's learning-rate factor 1 / sqrt(1 + ||row||^2 / eta^2), shaped to broadcast."""
        norms = parameter.detach().float().norm(dim=-1, keepdim=True)
        return (1.0 + norms.square() / self.eta**2).rsqrt()

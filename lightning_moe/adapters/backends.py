"""Compute backends for a bank of stacked LoRA experts.

Every backend computes, for each token n and each of its k routing slots j,

    out[n] = sum_j weights[n, j] * B[e] @ A[e] @ x[n]    with e = indices[n, j],

from the same stacked weights A: [E, r, in], B: [E, out, r]. `loop_experts` is the readable
reference; the others must match it in outputs and in the gradients of x, A, B and weights.
"auto" (`auto_backend`) picks one per call from what `make bench` measured.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

ExpertBackend = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
Backend = Literal["auto", "loop", "dense", "grouped"]


def loop_experts(x: Tensor, A: Tensor, B: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """Reference: a Python loop over experts, each on the tokens routed to it."""
    out = x.new_zeros(x.shape[0], B.shape[1])
    for expert in range(A.shape[0]):
        token, slot = (indices == expert).nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        y = x[token] @ A[expert].T @ B[expert].T
        out = out.index_add(0, token, y * weights[token, slot, None])
    return out


def dense_experts(x: Tensor, A: Tensor, B: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """One matmul to all E*r expert ranks, zero the unrouted ones, one matmul back.

    Costs the FLOPs of a rank-E*r LoRA but has no data-dependent shapes, so it compiles
    into a single graph and is fast when E*r is small next to the layer width.
    """
    num_experts, rank, in_features = A.shape
    gates = x.new_zeros(x.shape[0], num_experts).scatter_add(1, indices, weights)
    hidden = x @ A.reshape(num_experts * rank, in_features).T
    hidden = (hidden.view(-1, num_experts, rank) * gates[:, :, None]).reshape(-1, num_experts * rank)
    return hidden @ B.transpose(1, 2).reshape(num_experts * rank, B.shape[1])


def grouped_experts(x: Tensor, A: Tensor, B: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """Sort (token, slot) pairs by expert, then two grouped GEMMs over the jagged groups."""
    num_tokens, top_k = indices.shape
    num_experts, rank, in_features = A.shape
    out_features = B.shape[1]
    flat_expert = indices.reshape(-1)
    order = flat_expert.argsort(stable=True)
    token = order // top_k
    # counts via scatter_add keeps a static shape (bincount's length depends on the data)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=x.device)
    counts = counts.scatter_add(0, flat_expert, torch.ones_like(flat_expert))
    offsets = counts.cumsum(0).to(torch.int32)

    # grouped GEMM kernels want every row stride to be a multiple of 16 bytes: pad with zeros
    multiple = max(1, 16 // x.element_size())
    xs = _pad_last(x[token], multiple)
    a_t = _pad_last(_pad_dim(A, 1, multiple), multiple).transpose(1, 2)  # [E, in', r']
    b_t = _pad_dim(_pad_last(B, multiple), 1, multiple).transpose(1, 2)  # [E, r', out']
    hidden = _grouped_mm(xs, a_t, offsets)
    y = _grouped_mm(hidden, b_t, offsets)[:, :out_features]
    y = y * weights.reshape(-1)[order, None]
    return x.new_zeros(num_tokens, out_features).index_add(0, token, y)


BACKENDS: dict[str, ExpertBackend] = {
    "loop": loop_experts,
    "dense": dense_experts,
    "grouped": grouped_experts,
}


# On CPU the dense path won every measured shape until the bank held more than this many times
# the routed experts; past it, computing every expert's ranks for every token costs more than
# sorting tokens for the grouped GEMMs (docs/benchmarks.md, `make bench`).
DENSE_MAX_EXPERTS_PER_ROUTED = 16


def auto_backend(x: Tensor, num_experts: int, top_k: int) -> str:
    """The backend measured fastest for this input: torch's grouped GEMM kernel on CUDA with
    bfloat16 (compute follows the routed experts only), else dense for banks up to
    DENSE_MAX_EXPERTS_PER_ROUTED x top_k experts, else grouped."""
    if x.is_cuda and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0):
        return "grouped"
    return "dense" if num_experts <= DENSE_MAX_EXPERTS_PER_ROUTED * top_k else "grouped"


def expert_backend(name: str, x: Tensor, num_experts: int, top_k: int) -> ExpertBackend:
    """The backend function a config names, resolving "auto" for this input."""
    return BACKENDS[auto_backend(x, num_experts, top_k) if name == "auto" else name]


def _pad_last(t: Tensor, multiple: int) -> Tensor:
    extra = -t.shape[-1] % multiple
    return F.pad(t, (0, extra)) if extra else t


def _pad_dim(t: Tensor, dim: int, multiple: int) -> Tensor:
    return _pad_last(t.transpose(dim, -1), multiple).transpose(dim, -1)


def _grouped_mm(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    # torch's fake-tensor rule for grouped_mm only admits 16-bit inputs, so fp32 goes through
    # an opaque custom op that compiles (fullgraph) and runs the same eager kernel.
    if a.dtype == torch.float32:
        return grouped_mm_fp32(a, b, offsets)
    return F.grouped_mm(a, b, offs=offsets)


@torch.library.custom_op("lightning_moe::grouped_mm_fp32", mutates_args=())
def grouped_mm_fp32(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    """[total, K] x [G, K, N] -> [total, N], rows of `a` grouped by cumulative `offsets`."""
    return F.grouped_mm(a, b, offs=offsets)


@grouped_mm_fp32.register_fake
def _(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    return a.new_empty(a.shape[0], b.shape[-1])


@torch.library.custom_op("lightning_moe::grouped_mm_fp32_weight_grad", mutates_args=())
def grouped_mm_fp32_weight_grad(a: Tensor, grad: Tensor, offsets: Tensor) -> Tensor:
    """Per-group a_g^T @ grad_g -> [G, K, N], the gradient of the 3D operand."""
    return F.grouped_mm(a.t(), grad, offs=offsets)


@grouped_mm_fp32_weight_grad.register_fake
def _(a: Tensor, grad: Tensor, offsets: Tensor) -> Tensor:
    return a.new_empty(offsets.shape[0], a.shape[1], grad.shape[1])


def _grouped_mm_setup(ctx, inputs, output) -> None:
    a, b, offsets = inputs
    ctx.save_for_backward(a, b, offsets)


def _grouped_mm_backward(ctx, grad: Tensor):
    a, b, offsets = ctx.saved_tensors
    grad = grad.contiguous()
    grad_a = grouped_mm_fp32(grad, b.transpose(1, 2), offsets)
    grad_b = grouped_mm_fp32_weight_grad(a, grad, offsets)
    return grad_a, grad_b, None


grouped_mm_fp32.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)

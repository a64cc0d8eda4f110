"""Expert compute backends: `dense` and `grouped` agree with the `loop` reference in outputs and
in the gradients of x, A, B and the routing weights, eager and under torch.compile."""

import copy

import pytest
import torch
from torch import nn

from lightning_moe.adapters import BACKENDS, MoEConfig
from lightning_moe.adapters.backends import DENSE_MAX_EXPERTS_PER_ROUTED, auto_backend
from lightning_moe.adapters.moe import MoEAdapter
from tests.tolerances import FLOAT64_RTOL

NUM_EXPERTS = 4
IN_FEATURES, OUT_FEATURES = 21, 11  # not multiples of 4 or 8: the grouped backend pads every dim

# The reference is the loop in float64 (exact for these purposes). Loop and dense run in float64
# too; the grouped backend cannot (torch's grouped GEMM takes fp32/bf16/fp16 only), so its fp32 and
# bf16 results get tolerances from their rounding unit u (used as rtol and as the fraction of each
# tensor's largest |value| for atol):
# - fp32 accumulates: a sum of n terms errs by at most n*u*sum|terms|. The longest chain here
#   (grad_A: over the output features, then the tokens) has n < 64, and sum|terms| stays within
#   4x the largest |value| of these random problems: 256 * 2^-24 = 1.5e-5.
# - bf16 matmuls accumulate in fp32, so bf16 error is the number of roundings to bf16 along a
#   value's path: 4 inputs (x, A, B, weights), the hidden ranks, the output, the weighting and
#   the sum over slots, about as many on the way back: 10 * 2^-8 = 3.9e-2.
FP32_TOL = 256 * 2.0**-24
BF16_TOL = 10 * 2.0**-8


def routing_problem(top_k: int, rank: int, num_tokens: int = 23, seed: int = 0):
    """fp32 leaves (x, A, B, weights), the indices, and a fixed projection for a linear loss
    (drawn in fp32, so every dtype sees the same values).

    Routing is deliberately uneven: expert 0 takes most tokens, expert 2 few, expert 3 none.
    """
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    logits = randn(num_tokens, NUM_EXPERTS) + torch.tensor([2.0, 0.5, -1.0, float("-inf")])
    indices = logits.topk(top_k, dim=-1).indices
    counts = torch.bincount(indices.flatten(), minlength=NUM_EXPERTS)
    assert counts[3] == 0 and counts[0] > counts[2] > 0 and len(set(counts.tolist())) == NUM_EXPERTS
    leaves = {
        "x": randn(num_tokens, IN_FEATURES),
        "A": randn(NUM_EXPERTS, rank, IN_FEATURES) * 0.3,
        "B": randn(NUM_EXPERTS, OUT_FEATURES, rank) * 0.3,
        "weights": torch.rand(num_tokens, top_k, generator=generator),
    }
    projection = randn(num_tokens, OUT_FEATURES)
    return leaves, indices, projection


def linear_loss(out: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """sum(out * projection) in at least fp32 (bf16 outputs are summed in fp32)."""
    dtype = torch.promote_types(out.dtype, torch.float32)
    return (out.to(dtype) * projection.to(dtype)).sum()


def run_backend(fn, leaves, indices, projection, dtype):
    """Output and gradients (as float64) of a linear loss sum(out * projection)."""
    inputs = {name: value.detach().to(dtype).clone().requires_grad_() for name, value in leaves.items()}
    out = fn(inputs["x"], inputs["A"], inputs["B"], indices, inputs["weights"])
    assert out.dtype == dtype and out.shape == (indices.shape[0], OUT_FEATURES)
    linear_loss(out, projection).backward()
    result = {"out": out.detach().double()}
    result.update({f"grad_{name}": value.grad.double() for name, value in inputs.items()})
    return result


def assert_results_close(actual: dict, expected: dict, tol: float) -> None:
    """Elementwise closeness: rtol = tol, atol = tol x each tensor's largest |value|."""
    assert actual.keys() == expected.keys()
    for key in expected:
        atol = tol * expected[key].abs().max().item()
        torch.testing.assert_close(
            actual[key], expected[key], rtol=tol, atol=atol, msg=lambda m, k=key: f"{k}: {m}"
        )


TOLERANCE = {torch.float64: FLOAT64_RTOL, torch.float32: FP32_TOL, torch.bfloat16: BF16_TOL}
# loop and dense run in float64; grouped only in fp32 (or bf16)
EXACT_DTYPE = {"loop": torch.float64, "dense": torch.float64, "grouped": torch.float32}


@pytest.mark.parametrize("rank", [5, 8])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("backend", ["dense", "grouped"])
def test_backend_matches_loop(backend, top_k, rank):
    dtype = EXACT_DTYPE[backend]
    leaves, indices, projection = routing_problem(top_k, rank)
    reference = run_backend(BACKENDS["loop"], leaves, indices, projection, torch.float64)
    result = run_backend(BACKENDS[backend], leaves, indices, projection, dtype)
    assert_results_close(result, reference, TOLERANCE[dtype])
    # the unrouted expert gets exactly zero gradient, the others do not
    for name in ("grad_A", "grad_B"):
        assert torch.count_nonzero(result[name][3]) == 0
        assert all(result[name][e].abs().sum() > 0 for e in range(3))


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("backend", ["loop", "dense", "grouped"])
def test_backend_bf16_matches_loop(backend, top_k):
    leaves, indices, projection = routing_problem(top_k, rank=5)
    reference = run_backend(BACKENDS["loop"], leaves, indices, projection, torch.float64)
    result = run_backend(BACKENDS[backend], leaves, indices, projection, torch.bfloat16)
    assert_results_close(result, reference, BF16_TOL)


def test_backends_handle_a_single_token_and_all_tokens_on_one_expert():
    leaves, _, projection = routing_problem(top_k=1, rank=3)
    leaves = {name: value[:5] if name in ("x", "weights") else value for name, value in leaves.items()}
    projection = projection[:5]
    indices = torch.full((5, 1), 2)
    reference = run_backend(BACKENDS["loop"], leaves, indices, projection, torch.float64)
    for backend in ("dense", "grouped"):
        dtype = EXACT_DTYPE[backend]
        result = run_backend(BACKENDS[backend], leaves, indices, projection, dtype)
        assert_results_close(result, reference, TOLERANCE[dtype])
    one = {name: value[:1] if name in ("x", "weights") else value for name, value in leaves.items()}
    reference = run_backend(BACKENDS["loop"], one, indices[:1], projection[:1], torch.float64)
    for backend in ("dense", "grouped"):
        dtype = EXACT_DTYPE[backend]
        result = run_backend(BACKENDS[backend], one, indices[:1], projection[:1], dtype)
        assert_results_close(result, reference, TOLERANCE[dtype])


def moe_layer(top_k: int, router_gradient: str = "prob", rank: int = 5, dtype=torch.float64) -> MoEAdapter:
    torch.manual_seed(0)
    base = nn.Linear(IN_FEATURES, OUT_FEATURES, dtype=dtype)
    config = MoEConfig(
        rank=rank,
        alpha=10.0,
        num_experts=NUM_EXPERTS,
        top_k=top_k,
        router_gradient=router_gradient,
        backend="loop",
    )
    adapter = MoEAdapter(base, config)
    with torch.no_grad():
        adapter.experts.lora_B.normal_(std=0.3)  # B = 0 at init would hide every router gradient
    return adapter


def adapter_grads(adapter: MoEAdapter, x: torch.Tensor, projection: torch.Tensor) -> dict:
    """Output and gradients (as float64) of a linear loss; x is fed in the adapter's dtype."""
    x = x.detach().to(adapter.experts.lora_A.dtype, copy=True).requires_grad_()
    out = adapter(x)
    linear_loss(out, projection).backward()
    return {
        "out": out.detach().double(),
        "grad_x": x.grad.double(),
        "grad_gate": adapter.router.gate.weight.grad.double(),
        "grad_A": adapter.experts.lora_A.grad.double(),
        "grad_B": adapter.experts.lora_B.grad.double(),
    }


def assert_same_routing(layer: MoEAdapter, reference: MoEAdapter, x: torch.Tensor) -> None:
    """A lower precision may flip a near-tie in the top-k choice; compare only when they agree."""
    flat = x.flatten(0, 1)
    with torch.no_grad():
        chosen = layer.router(flat.to(layer.router.gate.weight.dtype))[0]
        assert torch.equal(chosen, reference.router(flat.to(reference.router.gate.weight.dtype))[0])


@pytest.mark.parametrize(("top_k", "router_gradient"), [(1, "prob"), (1, "straight_through"), (2, "prob")])
@pytest.mark.parametrize("backend", ["dense", "grouped"])
def test_moe_adapter_backends_match_loop_including_router_gradient(backend, top_k, router_gradient):
    reference_layer = moe_layer(top_k, router_gradient)
    dtype = EXACT_DTYPE[backend]
    layer = copy.deepcopy(reference_layer).to(dtype)
    layer.backend = backend
    torch.manual_seed(1)
    x = torch.randn(3, 7, IN_FEATURES)
    projection = torch.randn(3, 7, OUT_FEATURES)
    reference = adapter_grads(reference_layer, x, projection)
    assert reference["grad_gate"].abs().sum() > 0
    assert_same_routing(layer, reference_layer, x)
    assert_results_close(adapter_grads(layer, x, projection), reference, TOLERANCE[dtype])


@pytest.mark.parametrize("backend", ["dense", "grouped"])
def test_moe_adapter_bf16_matches_loop(backend):
    reference_layer = moe_layer(top_k=2)
    layer = copy.deepcopy(reference_layer).to(torch.bfloat16)
    layer.backend = backend
    torch.manual_seed(1)
    x = torch.randn(3, 7, IN_FEATURES)
    projection = torch.randn(3, 7, OUT_FEATURES)
    reference = adapter_grads(reference_layer, x, projection)
    assert_same_routing(layer, reference_layer, x)
    assert_results_close(adapter_grads(layer, x, projection), reference, BF16_TOL)


# --- torch.compile: three small compiles (dense bf16, grouped bf16, grouped fp32), all fullgraph ---


@pytest.fixture(scope="module")
def inductor_cache(tmp_path_factory):
    import os

    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path_factory.mktemp("inductor"))
    yield
    if previous is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("backend", "dtype"),
    [("dense", torch.bfloat16), ("grouped", torch.bfloat16), ("grouped", torch.float32)],
)
def test_compiled_backend_fullgraph_matches_eager(inductor_cache, backend, dtype):
    leaves, indices, projection = routing_problem(top_k=2, rank=5)
    compiled = torch.compile(BACKENDS[backend], fullgraph=True)
    eager = run_backend(BACKENDS[backend], leaves, indices, projection, dtype)
    result = run_backend(compiled, leaves, indices, projection, dtype)
    # each is within TOLERANCE of the exact result (compiled code may round intermediates
    # differently, e.g. keep them in fp32), so the two are within twice that of each other
    assert_results_close(result, eager, 2 * TOLERANCE[dtype])
    reference = run_backend(BACKENDS["loop"], leaves, indices, projection, torch.float64)
    assert_results_close(result, reference, TOLERANCE[dtype])


# --- "auto": a measured choice per input, overridable by naming a backend ---


def test_auto_backend_choice_follows_device_dtype_and_bank_size():
    x = torch.randn(4, IN_FEATURES)
    assert auto_backend(x, num_experts=8, top_k=1) == "dense"
    assert auto_backend(x.bfloat16(), num_experts=16, top_k=1) == "dense"  # grouped only on CUDA
    limit = DENSE_MAX_EXPERTS_PER_ROUTED
    assert auto_backend(x, num_experts=limit, top_k=1) == "dense"
    assert auto_backend(x, num_experts=limit + 1, top_k=1) == "grouped"
    assert auto_backend(x, num_experts=2 * limit, top_k=2) == "dense"


# auto picks dense for the small bank (run in float64) and grouped for the big one (fp32 only)
@pytest.mark.parametrize(
    ("num_experts", "dtype"),
    [(NUM_EXPERTS, torch.float64), (4 * DENSE_MAX_EXPERTS_PER_ROUTED, torch.float32)],
)
def test_auto_backend_layer_matches_loop(num_experts, dtype):
    torch.manual_seed(0)
    base = nn.Linear(IN_FEATURES, OUT_FEATURES, dtype=torch.float64)
    config = MoEConfig(rank=3, alpha=6.0, num_experts=num_experts, top_k=2, backend="loop")
    reference_layer = MoEAdapter(base, config)
    with torch.no_grad():
        reference_layer.experts.lora_B.normal_(std=0.3)
    layer = copy.deepcopy(reference_layer).to(dtype)
    layer.backend = "auto"
    x, projection = torch.randn(2, 9, IN_FEATURES), torch.randn(2, 9, OUT_FEATURES)
    expected = adapter_grads(reference_layer, x, projection)
    assert_same_routing(layer, reference_layer, x)
    assert_results_close(adapter_grads(layer, x, projection), expected, TOLERANCE[dtype])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA grouped GEMM path needs a GPU")
def test_auto_backend_takes_the_cuda_grouped_gemm_in_bf16():
    gpu = torch.device("cuda")
    x = torch.randn(4, IN_FEATURES, device=gpu, dtype=torch.bfloat16)
    expected = "grouped" if torch.cuda.get_device_capability() >= (8, 0) else "dense"
    assert auto_backend(x, num_experts=8, top_k=1) == expected
    leaves, indices, projection = routing_problem(top_k=2, rank=8)
    reference = run_backend(BACKENDS["loop"], leaves, indices, projection, torch.float64)
    on_gpu = {name: value.to(gpu) for name, value in leaves.items()}
    result = run_backend(BACKENDS["grouped"], on_gpu, indices.to(gpu), projection.to(gpu), torch.bfloat16)
    assert_results_close({k: v.cpu() for k, v in result.items()}, reference, BF16_TOL)


@pytest.mark.slow
def test_compiled_moe_adapter_fullgraph_with_router_and_collector_matches_eager(inductor_cache):
    """The whole adapted expert path (router, top-k, routing side channel, auto backend) compiles
    without a graph break and equals eager in outputs and every gradient (in float64, where auto
    means dense)."""
    from lightning_moe.adapters.routing import RoutingCollector

    eager_layer = moe_layer(top_k=2)
    eager_layer.backend = "auto"
    compiled_layer = copy.deepcopy(eager_layer)
    for layer in (eager_layer, compiled_layer):
        layer.layer_name, layer.collector = "proj", RoutingCollector()
    compiled_layer.compile(fullgraph=True)
    torch.manual_seed(1)
    x, projection = torch.randn(3, 7, IN_FEATURES), torch.randn(3, 7, OUT_FEATURES)
    with eager_layer.collector.capture() as eager_records:
        expected = adapter_grads(eager_layer, x, projection)
    with compiled_layer.collector.capture() as compiled_records:
        result = adapter_grads(compiled_layer, x, projection)
    assert_results_close(result, expected, FLOAT64_RTOL)
    assert torch.equal(compiled_records["proj"].indices, eager_records["proj"].indices)

"""How tests compare numbers: exact maths in float64, trained runs by loss and state norms.

Tolerances follow from what is compared, not from one machine's kernels (see docs/reliability.md
and `make test-cpus`).
"""

import torch

# Exact maths computed through different kernels (merged vs unmerged LoRA, a backend vs its loop
# reference, ...) is compared in float64: every rounding there is ~1e-16 relative, so even long
# chains of operations stay orders of magnitude below 1e-10, whichever kernels the CPU picks,
# while a real bug (a wrong scale, a leaked expert, a dropped term) shows at the size of the terms.
FLOAT64_RTOL = 1e-10


def assert_same_maths(actual, expected, rtol: float = FLOAT64_RTOL, msg=None) -> None:
    """assert_close for float64 results of exact maths. The absolute tolerance is rtol times the
    largest |expected|, so entries that cancel to about 0 are judged on the scale of the tensor."""
    assert actual.dtype == expected.dtype == torch.float64, (actual.dtype, expected.dtype)
    atol = rtol * expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=msg)


# Training runs that round differently (compiled vs eager kernels) differ in losses and gradients
# by ~sqrt(n) * u per sum of n terms, n <= 259 (the vocabulary), ~16 sums in a row: ~1.5e-5 in
# fp32 (u = 6e-8). They cannot agree elementwise after several AdamW steps: AdamW divides each
# gradient element by its own magnitude, so an element whose gradient is within rounding of zero
# may step by up to 2 * lr differently. Such elements hardly change the loss (their gradient is
# ~0) and weigh little in the whole adapter state: at lr = 0.01 one weighs 0.02 against a state
# norm of ~10 (LoRA A's init), 2e-3. So trained runs are compared by their losses at every step
# (rtol 1e-4) and by the relative norm of the difference of the whole adapter state (1e-2: room
# for a few such elements). A real difference is far larger: a router that does not train, or a
# dropped balance loss, moves the state by ~0.2; a 1% learning-rate change moves the loss by 5e-4
# after two steps.
TRAINED_LOSS_RTOL = 1e-4
TRAINED_STATE_RTOL = 1e-2


def relative_difference(actual: dict, expected: dict) -> float:
    """||actual - expected|| / ||expected|| over all tensors of two state dicts with the same keys."""
    assert actual.keys() == expected.keys()
    for key in expected:
        assert actual[key].shape == expected[key].shape, key
    difference = sum(float((actual[k].double() - expected[k].double()).square().sum()) for k in expected)
    size = sum(float(expected[k].double().square().sum()) for k in expected)
    return (difference / size) ** 0.5

"""kind `l4q`: LSQ fake quantisation of W + s B A, its gradients (straight-through rounding, LSQ's
step-size gradient) against the formulas, and the merged quantised weight."""

import pytest
import torch
from torch import nn

from lightning_moe.adapters import (
    AdapterConfigError,
    AdapterRule,
    L4QConfig,
    adapted_layers,
    inject,
    load_adapter,
    merge_adapters,
    save_adapter,
    set_fake_quantization,
    unmerge_adapters,
)
from lightning_moe.adapters.quantized import QuantizeConfig, quantize_base
from tests.tolerances import assert_same_maths

CONFIG = L4QConfig(rank=3, alpha=6, bits=4, group_size=8)


def l4q_linear(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 6)).double()
    inject(model, [AdapterRule(targets=["0"], adapter=CONFIG)])
    adapter = model[0].adapter
    with torch.no_grad():
        adapter.lora_A.normal_(0, 0.3)
        adapter.lora_B.normal_(0, 0.3)
    return model


def reference(weight, bias, a, b, step, x, scaling, qn=8, qp=7, group=8):
    """The paper's formulas, element by element: codes, quantised weight, output and the
    gradients of sum(output * upstream) with respect to A, B and the step sizes."""
    adapted = weight + scaling * b @ a
    steps = step.repeat_interleave(group, dim=1)
    v = adapted / steps
    codes = v.clamp(-qn, qp).round()
    quantized = codes * steps
    out = x @ quantized.T + bias
    upstream = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    grad_quantized = upstream.T @ x  # dL / dW_q
    inside = (v > -qn) & (v < qp)
    grad_adapted = grad_quantized * inside  # straight through inside the range, 0 outside
    grad_a = scaling * b.T @ grad_adapted
    grad_b = scaling * grad_adapted @ a.T
    dq_dstep = torch.where(inside, v.round() - v, codes)  # LSQ: round(v) - v, or the bound -Qn / Qp
    grad_step = (grad_quantized * dq_dstep).reshape(*step.shape, group).sum(-1) / (group * qp) ** 0.5
    return out, upstream, codes, (grad_a, grad_b, grad_step)


def test_forward_and_gradients_match_the_formulas():
    model = l4q_linear()
    layer = model[0]
    adapter = layer.adapter
    with torch.no_grad():  # put some weights outside the range so the clamp branch is exercised
        adapter.step_size.mul_(0.4)
    x = torch.randn(5, 16, dtype=torch.float64)
    expected, upstream, codes, grads = reference(
        layer.base_layer.weight,
        layer.base_layer.bias,
        adapter.lora_A,
        adapter.lora_B,
        adapter.step_size.detach(),
        x,
        adapter.scaling,
    )
    assert (codes == -8).any() or (codes == 7).any()
    out = model(x)
    assert_same_maths(out, expected.detach())
    (out * upstream).sum().backward()
    for name, grad in zip(("lora_A", "lora_B", "step_size"), grads, strict=True):
        assert_same_maths(getattr(adapter, name).grad, grad.detach(), msg=name)
    assert layer.base_layer.weight.grad is None


def test_merge_writes_the_quantised_weight_and_unmerge_restores_w():
    model = l4q_linear()
    x = torch.randn(4, 16, dtype=torch.float64)
    before = model(x).detach()
    weight = model[0].base_layer.weight.detach().clone()
    codes, steps = model[0].adapter.integer_codes(weight)
    assert codes.dtype == torch.int8 and codes.min() >= -8 and codes.max() <= 7
    merge_adapters(model)
    merged = model[0].base_layer.weight.detach()
    assert torch.equal(merged, codes.double() * steps.repeat_interleave(8, dim=1))
    assert_same_maths(model(x), before)
    unmerge_adapters(model)
    assert torch.equal(model[0].base_layer.weight, weight)


def test_unquantised_switch_computes_w_plus_lora():
    model = l4q_linear()
    x = torch.randn(4, 16, dtype=torch.float64)
    layer = model[0]
    assert set_fake_quantization(model, False) == 1
    lora = layer.base_layer.weight + layer.adapter.scaling * layer.adapter.lora_B @ layer.adapter.lora_A
    assert_same_maths(model(x), (x @ lora.T + layer.base_layer.bias).detach())
    set_fake_quantization(model, True)
    assert (model(x) - x @ lora.T - layer.base_layer.bias).abs().max() > 1e-4


@pytest.mark.parametrize("step_init", ["absmax", "lsq"])
def test_initial_steps(step_init):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 6)).double()
    inject(model, [AdapterRule(targets=["0"], adapter=L4QConfig(group_size=8, step_init=step_init))])
    groups = model[0].base_layer.weight.detach().abs().reshape(6, 2, 8)
    expected = groups.amax(-1) / 7 if step_init == "absmax" else 2 * groups.mean(-1) / 7**0.5
    assert_same_maths(model[0].adapter.step_size.detach(), expected)
    if step_init == "absmax":  # no weight is clipped at the start: codes reach -7..7 at most
        codes, _ = model[0].adapter.integer_codes(model[0].base_layer.weight)
        assert codes.abs().max() == 7


def test_round_trip_keeps_steps(tmp_path):
    model = l4q_linear()
    with torch.no_grad():
        model[0].adapter.step_size.mul_(1.3)
    folder = save_adapter(model, [AdapterRule(targets=["0"], adapter=CONFIG)], tmp_path / "l4q")
    again = nn.Sequential(nn.Linear(16, 6)).double()
    with torch.no_grad():
        again[0].load_state_dict(model[0].base_layer.state_dict())
    load_adapter(again, folder)
    x = torch.randn(3, 16, dtype=torch.float64)
    assert torch.equal(again(x), model(x))
    assert len(list(adapted_layers(again))) == 1


def test_bad_l4q_settings_are_one_error():
    with pytest.raises(AdapterConfigError, match="bits must be between 2 and 8"):
        L4QConfig(bits=9)
    with pytest.raises(AdapterConfigError, match="no adapter input to drop"):
        L4QConfig(dropout=0.1)
    with pytest.raises(AdapterConfigError, match="init='pissa' does not apply to L4Q"):
        L4QConfig(init="pissa")
    with pytest.raises(AdapterConfigError, match="group_size=5 does not divide the layer's 16 inputs"):
        inject(nn.Sequential(nn.Linear(16, 6)), [AdapterRule(targets=["0"], adapter=L4QConfig(group_size=5))])
    quantized = nn.Sequential(nn.Linear(64, 64))
    quantize_base(quantized, QuantizeConfig(skip=[]))
    with pytest.raises(AdapterConfigError, match="needs the full-precision W; remove the model's `quantize`"):
        inject(quantized, [AdapterRule(targets=["0"], adapter=L4QConfig())])
    model = l4q_linear()
    with pytest.raises(AdapterConfigError, match="not a low-rank delta"):
        model[0].adapter.delta_weight()

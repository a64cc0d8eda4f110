"""The start error of each 4-bit scheme on SmolLM2-135M-Instruct's block linears (docs/memory.md):
mean over the 210 layers of ||W - Q(W)|| / ||W||.

    python scripts/quantiser_errors.py

NF4 (blocks of 64, our `quantize`) against L4Q's uniform symmetric 4-bit grid with one step per
64 inputs of a row, started from each group's max |w| / 7 (`step_init: absmax`) or from LSQ's
2 mean|w| / sqrt(7) (`step_init: lsq`).
"""

from __future__ import annotations

import statistics

import torch
from torch import nn

from lightning_moe.adapters import AdapterRule, L4QConfig, inject
from lightning_moe.adapters.quantized import QuantizeConfig, QuantizedLinear
from lightning_moe.tasks.reasoning.causal_lm import build_causal_lm

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def l4q_errors(model: nn.Module, step_init: str) -> list[float]:
    errors = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in LINEARS:
            layer = nn.Sequential(nn.Linear(module.in_features, module.out_features, bias=False))
            layer[0].weight.data = module.weight.detach()
            inject(layer, [AdapterRule(targets=["0"], adapter=L4QConfig(step_init=step_init))])
            weight = layer[0].base_layer.weight
            errors.append(float((layer[0].adapter.merged_weight(weight) - weight).norm() / weight.norm()))
    return errors


def main() -> None:
    model = build_causal_lm("smollm2-135m-instruct", None, 0, torch.float32)
    results = {f"L4Q start, step_init {init}": l4q_errors(model, init) for init in ("absmax", "lsq")}
    results["NF4 (quantize)"] = [
        QuantizedLinear(m, QuantizeConfig()).relative_error
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in LINEARS
    ]
    print("| scheme | layers | mean ||W - Q(W)|| / ||W|| |\n|---|---:|---:|")
    for scheme, errors in results.items():
        print(f"| {scheme} | {len(errors)} | {statistics.mean(errors):.4f} |")


if __name__ == "__main__":
    main()

"""Forward+backward time of one adapted linear layer, side by side with peft, as ratios.

    python benchmarks/adapter_layers.py --output docs/benchmarks.md

Every variant runs in the same process on the same input; rounds interleave the variants so
drift in machine load hits all of them alike. Reported: median ms per step, spread
(interquartile range) and the ratio of medians to peft LoRA of the same rank.
"""

from __future__ import annotations

import argparse
import copy
import platform
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from timing import measure, publish, ratio_table
from torch import nn

from lightning_moe.adapters import AdapterRule, LoraConfig, MoELoraConfig, inject

SHAPES = {"smollm2-mlp": (576, 1536), "7b-mlp": (4096, 11008)}


class OneLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def variants(in_features: int, out_features: int, rank: int) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    base = OneLinear(in_features, out_features)
    frozen = copy.deepcopy(base).requires_grad_(False)
    models = {"frozen linear": frozen}
    peft_model = get_peft_model(
        copy.deepcopy(base), PeftLoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"])
    )
    models["peft LoRA"] = peft_model
    ours = copy.deepcopy(base)
    inject(ours, [AdapterRule(["proj"], LoraConfig(rank=rank, alpha=2 * rank))])
    models["ours LoRA"] = ours
    for experts in (4, 8, 16):
        for top_k in (1, 2):
            for backend in ("loop", "dense", "grouped"):
                model = copy.deepcopy(base)
                config = MoELoraConfig(
                    rank=rank, alpha=2 * rank, num_experts=experts, top_k=top_k, backend=backend
                )
                inject(model, [AdapterRule(["proj"], config)])
                models[f"MoE E={experts} top-{top_k} {backend}"] = model
    return models


def step_fn(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        model(x).float().square().mean().backward()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["smollm2-mlp"], choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    lines = [
        "# Adapter layer benchmark",
        "",
        f"Command: `python benchmarks/adapter_layers.py --shapes {' '.join(args.shapes)} --tokens {args.tokens} "
        f"--rank {args.rank} --rounds {args.rounds} --dtype {args.dtype}`",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{datetime.now(UTC):%Y-%m-%d}. Forward + backward of one layer on {args.tokens} tokens.",
    ]
    for shape in args.shapes:
        in_features, out_features = SHAPES[shape]
        models = {
            name: model.to(dtype) for name, model in variants(in_features, out_features, args.rank).items()
        }
        x = torch.randn(args.tokens, in_features, dtype=dtype)
        lines += ["", f"## {shape} ({in_features} → {out_features}), {args.dtype}, rank {args.rank}", ""]
        steps = {name: step_fn(model, x.clone().requires_grad_(True)) for name, model in models.items()}
        lines += ratio_table(measure(steps, args.rounds, args.warmup), "peft LoRA")
    publish(lines, args.output)


if __name__ == "__main__":
    main()

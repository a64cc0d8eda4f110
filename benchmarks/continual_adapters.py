"""Forward+backward time and activation memory of one layer with each continual-learning adapter,
side by side with peft LoRA, as ratios; early in a stream (one task learned) and late (four).

    python benchmarks/continual_adapters.py --output docs/benchmarks_continual.md

Late in a stream, CoDyRA carries the merged ranks of earlier tasks in its low-rank store and MoRA
scores every frozen atom too, so their cost grows with the tasks; LoRA's and MoE-Adapters' do
not. Rounds interleave the variants (see timing.py).
"""

from __future__ import annotations

import argparse
import copy
import platform
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch
from adapter_layers import OneLinear, saved_activation_mb, step_fn
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from timing import measure, publish, ratio_table
from torch import nn

from lightning_moe.adapters import (
    AdapterRule,
    CodyraConfig,
    LoraConfig,
    MoraConfig,
    TaskMoEConfig,
    end_task,
    inject,
)

# MiniLM's attention projection (the embedded CLIP's text tower) and ViT-B/16's fused in_proj
SHAPES = {"minilm-attention": (384, 384), "vit-b16-in-proj": (768, 2304)}


def learned_tasks(model: nn.Module, tasks: int) -> nn.Module:
    """The model after `tasks` task ends, each with random trained-looking weights (so MoRA and
    CoDyRA keep every atom and rank)."""
    for _ in range(tasks):
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(std=0.01)
        end_task(model)
    return model


def variants(in_features: int, out_features: int, rank: int, late: int) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    base = OneLinear(in_features, out_features)
    models: dict[str, nn.Module] = {"frozen linear": copy.deepcopy(base).requires_grad_(False)}
    models["peft LoRA"] = get_peft_model(
        copy.deepcopy(base), PeftLoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"])
    )
    ours = copy.deepcopy(base)
    inject(ours, [AdapterRule(["proj"], LoraConfig(rank=rank, alpha=2 * rank))])
    models["ours LoRA"] = ours  # the same cost at every task
    configs = {
        "CoDyRA": CodyraConfig(rank=rank, alpha=2 * rank, num_tasks=late),
        "MoRA top-4": MoraConfig(rank=rank // 2, alpha=rank, num_tasks=late, top_k=4),
        "MoE-Adapters E=4 top-2": TaskMoEConfig(
            rank=rank // 2, alpha=rank, num_experts=4, top_k=2, num_tasks=late
        ),
    }
    for name, config in configs.items():
        for tasks in (0, late - 1):
            model = copy.deepcopy(base)
            inject(model, [AdapterRule(["proj"], config)])
            models[f"{name}, task {tasks + 1}"] = learned_tasks(model, tasks)
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, default=1280, help="e.g. 20 prompts x 64 tokens")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--tasks", type=int, default=4, help="the late point of the stream")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()

    lines = [
        "# Continual-learning adapter benchmark",
        "",
        f"Command: `{shlex.join(['python', *sys.argv])}`, with shapes {args.shapes}, {args.tokens} tokens, "
        f"rounds {args.rounds} after {args.warmup} warm-up steps, rank {args.rank} (MoRA and MoE-Adapters: "
        f"{args.rank // 2} per atom set or expert), float32, eager.",
        f"Machine: {platform.machine()}, cpu, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{datetime.now(UTC):%Y-%m-%d}. Forward + backward of one layer; 'task t' is the cost while "
        "training task t (t - 1 tasks already learned).",
    ]
    for shape in args.shapes:
        in_features, out_features = SHAPES[shape]
        models = variants(in_features, out_features, args.rank, args.tasks)
        x = torch.randn(args.tokens, in_features).requires_grad_(True)
        memory = {name: f"{saved_activation_mb(model, x):.1f}" for name, model in models.items()}
        steps = {name: step_fn(model, x) for name, model in models.items()}
        lines += ["", f"## {shape} ({in_features} → {out_features}), {args.tokens} tokens", ""]
        lines += ratio_table(
            measure(steps, args.rounds, args.warmup), "peft LoRA", columns={"saved activations MB": memory}
        )
    publish(lines, args.output)


if __name__ == "__main__":
    main()

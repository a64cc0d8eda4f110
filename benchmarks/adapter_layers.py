"""Forward+backward time and activation memory of one adapted linear layer, side by side with
peft, eager and compiled, as ratios.

    python benchmarks/adapter_layers.py --output docs/benchmarks.md

Every variant of a table runs in the same process on the same input; rounds interleave the
variants so drift in machine load hits all of them alike. Reported: median ms per step, spread
(interquartile range), the ratio of medians to peft LoRA of the same rank, and the activation
memory autograd saves for the backward pass (parameters excluded; measured eagerly).
"""

from __future__ import annotations

import argparse
import copy
import platform
import shlex
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from timing import measure, publish, ratio_table
from torch import nn

from lightning_moe.adapters import AdapterRule, LoraConfig, MoEConfig, inject
from lightning_moe.adapters.backends import auto_backend

SHAPES = {"smollm2-mlp": (576, 1536), "7b-mlp": (4096, 11008)}
BACKENDS = ("loop", "dense", "grouped")


class OneLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def variants(in_features: int, out_features: int, rank: int, experts: list[int]) -> dict[str, nn.Module]:
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
    for count in experts:
        for top_k in (1, 2):
            for backend in BACKENDS:
                model = copy.deepcopy(base)
                config = MoEConfig(rank=rank, alpha=2 * rank, num_experts=count, top_k=top_k, backend=backend)
                inject(model, [AdapterRule(["proj"], config)])
                models[f"MoE E={count} top-{top_k} {backend}"] = model
    return models


def compiled(models: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """torch.compile of every adapted variant; fullgraph except the loop reference, whose
    data-dependent token counts break the graph by design."""
    return {
        f"{name} (compiled)": torch.compile(model, fullgraph="loop" not in name)
        for name, model in models.items()
        if name != "frozen linear"
    }


def step_fn(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        model(x).float().square().mean().backward()

    return step


def saved_activation_mb(model: nn.Module, x: torch.Tensor) -> float:
    """Megabytes of tensors autograd keeps for the backward pass, parameters excluded."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(x)
    del out
    return sum(storages.values()) / 2**20


def profile(step: Callable[[], None], steps: int = 10, rows: int = 12) -> list[str]:
    """Where a step's time goes: the operators with the most self CPU time over `steps` steps."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(steps):
            step()
    events = sorted(profiler.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)
    total = sum(event.self_cpu_time_total for event in events)
    lines = ["| operator | calls per step | self ms per step | share |", "|---|---:|---:|---:|"]
    for event in events[:rows]:
        lines.append(
            f"| `{event.key}` | {event.count / steps:.0f} | {event.self_cpu_time_total / steps / 1e3:.2f} | "
            f"{event.self_cpu_time_total / total:.0%} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=sorted(SHAPES))
    # bf16 only where the device has bf16 matmul kernels: on an AVX2 CPU one 7B-shape step takes
    # 85 s in bf16 against 0.4 s in fp32 (emulated), which measures the emulation, not the adapters
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=["float32", "bfloat16"] if torch.cuda.is_available() else ["float32"],
        choices=["float32", "bfloat16"],
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 256], help="per shape, in order")
    parser.add_argument("--rounds", type=int, nargs="+", default=[30, 5], help="per shape, in order")
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--profile", nargs="*", default=["peft LoRA", "MoE E=8 top-1 dense"], help="variants to profile"
    )
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()

    lines = [
        "# Adapter layer benchmark",
        "",
        f"Command: `{shlex.join(['python', *sys.argv])}`, with shapes {args.shapes}, "
        f"tokens {args.tokens}, rounds {args.rounds} after {args.warmup} warm-up steps, experts {args.experts}, "
        f"rank {args.rank}, dtypes {args.dtypes}, compiled variants: {args.compile}.",
        f"Machine: {platform.machine()}, {args.device}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}, {datetime.now(UTC):%Y-%m-%d}. Forward + backward of one layer.",
    ]
    for shape, tokens, rounds in zip(args.shapes, args.tokens, args.rounds, strict=True):
        in_features, out_features = SHAPES[shape]
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            eager = {
                name: model.to(args.device, dtype)
                for name, model in variants(in_features, out_features, args.rank, args.experts).items()
            }
            x = torch.randn(tokens, in_features, dtype=dtype, device=args.device).requires_grad_(True)
            memory = {name: saved_activation_mb(model, x) for name, model in eager.items()}
            models = eager | (compiled(eager) if args.compile else {})
            choices = ", ".join(
                f"E={count} top-{k}: {auto_backend(x, count, k)}" for count in args.experts for k in (1, 2)
            )
            lines += [
                "",
                f"## {shape} ({in_features} → {out_features}), {dtype_name}, rank {args.rank}, {tokens} tokens",
                "",
                f"`backend: auto` picks here: {choices}.",
                "",
            ]
            steps = {name: step_fn(model, x) for name, model in models.items()}
            saved = {
                name: f"{memory[name.removesuffix(' (compiled)')]:.1f}"
                for name in models
                if name.removesuffix(" (compiled)") in memory
            }
            lines += ratio_table(
                measure(steps, rounds, args.warmup), "peft LoRA", columns={"saved activations MB": saved}
            )
            for name in args.profile:
                lines += ["", f"Where the time of `{name}` goes (torch.profiler, 10 steps):", ""]
                lines += profile(steps[name])
            torch._dynamo.reset()
    publish(lines, args.output)


if __name__ == "__main__":
    main()

"""The frozen base in 4 bits against full precision: bytes of the base, peak memory of a training
step and its time, for our LoRA and MoLE, LoRAM's pruned base and L4Q's quantisation-aware
step, and for peft's LoRA and QLoRA (bitsandbytes), as ratios to our fp32 LoRA.

    python benchmarks/memory.py --output docs/benchmarks_memory.md      # make bench-memory

SmolLM2-135M's shape with random weights (tied embeddings, as the real model); rank 8 (alpha
16) on every attention and MLP linear, MoLE with 4 experts top-1 on the MLP. A step is forward,
backward and an AdamW step on a batch of `--batch` x `--tokens` tokens.

Peak memory is the resident set's high-water mark (Linux VmHWM) during `--peak-steps` steps in a
fresh process per variant, with the mark reset after the model is built: model, activations,
gradients and optimizer state, as the process really holds them. Times interleave the variants
in one process (`timing.measure`).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch
from timing import measure, publish, ratio_table
from torch import nn
from whole_model import LINEARS, base_model

from lightning_moe.adapters import AdapterRule, L4QConfig, LoraConfig, MoEConfig, inject
from lightning_moe.adapters.pruning import PruneConfig, channel_scores, prunable_mlps, prune_mlps
from lightning_moe.adapters.quantized import QuantizeConfig, QuantizedLinear, base_bytes, quantize_base

RANK, ALPHA = 8, 16
MLP = ["gate_proj", "up_proj", "down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def ours(
    mixture: bool, quantize: QuantizeConfig | None = None, prune: float = 0.0, l4q: bool = False
) -> nn.Module:
    model = base_model()
    if prune:
        config = PruneConfig(ratio=prune)
        prune_mlps(
            model,
            config,
            {name: channel_scores(m, config) for name, m in prunable_mlps(model, config).items()},
        )
    if quantize is not None:
        quantize_base(model, quantize)
    lora = L4QConfig(rank=RANK, alpha=ALPHA) if l4q else LoraConfig(rank=RANK, alpha=ALPHA)
    mlp = MoEConfig(rank=RANK, alpha=ALPHA, num_experts=4, top_k=1) if mixture else lora
    inject(model, [AdapterRule(ATTENTION, lora), AdapterRule(MLP, mlp)])
    return model


def peft_lora(quantized: bool) -> nn.Module:
    import peft

    model = base_model()
    if quantized:
        bnb_quantize(model)
    return peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=LINEARS))


def bnb_quantize(model: nn.Module) -> None:
    """Every block linear as bitsandbytes' NF4 Linear4bit (blocks of 64, double quantisation), as
    transformers' BitsAndBytesConfig(load_in_4bit) would; the tied head stays."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and name != "lm_head":
            layer = bnb.nn.Linear4bit(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                compute_dtype=torch.float32,
                quant_type="nf4",
                compress_statistics=True,
            )
            layer.weight = bnb.nn.Params4bit(
                module.weight.data,
                requires_grad=False,
                quant_type="nf4",
                blocksize=64,
                compress_statistics=True,
            )
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.to("cpu"))


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes of a tensor as stored: a bitsandbytes 4-bit weight adds its quantisation statistics."""
    total = tensor.numel() * tensor.element_size()
    state = getattr(tensor, "quant_state", None)
    if state is not None:
        extra = [state.absmax, state.code] + (
            [state.state2.absmax, state.state2.code] if state.nested else []
        )
        total += sum(t.numel() * t.element_size() for t in extra)
    return total


def is_adapter(name: str) -> bool:
    return "lora_" in name or ".adapter." in f".{name}"


def base_size(model: nn.Module) -> int:
    """Bytes of the frozen base: ours counts its quantised layers as stored, bitsandbytes' too."""
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        return base_bytes(model)
    named = {id(t): (n, t) for n, t in [*model.named_parameters(), *model.named_buffers()]}
    return sum(tensor_bytes(t) for n, t in named.values() if not is_adapter(n))


def block_linear_bytes(model: nn.Module) -> int:
    """Bytes of the attention and MLP linears' weights alone (the part that is quantised)."""
    total = 0
    for name, module in model.named_modules():
        if is_adapter(name) or not any(f"{linear}" in name.split(".") for linear in LINEARS):
            continue
        if isinstance(module, QuantizedLinear):
            total += module.stored_bytes()
        elif isinstance(module, nn.Linear):  # bitsandbytes' Linear4bit is an nn.Linear too
            total += tensor_bytes(module.weight)
    return total


VARIANTS = {
    "ours LoRA fp32": lambda: ours(False),
    "ours LoRA NF4": lambda: ours(False, QuantizeConfig()),
    "ours LoRA NF4 + NF4 embeddings": lambda: ours(False, QuantizeConfig(embeddings=True)),
    "ours LoRA, LoRAM 50 % pruned fp32": lambda: ours(False, prune=0.5),
    "ours L4Q (4-bit QAT) fp32": lambda: ours(False, l4q=True),
    "ours MoLE fp32": lambda: ours(True),
    "ours MoLE NF4": lambda: ours(True, QuantizeConfig()),
    "peft LoRA fp32": lambda: peft_lora(False),
    "peft QLoRA (bitsandbytes NF4)": lambda: peft_lora(True),
}


def training_step(model: nn.Module, batch: int, tokens: int):
    ids = torch.randint(0, 49152, (batch, tokens), generator=torch.Generator().manual_seed(0))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def high_water_mark_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def resident_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_of(variant: str, batch: int, tokens: int, steps: int) -> dict:
    """In this (fresh) process: build `variant`, reset the high-water mark, run `steps` steps."""
    model = VARIANTS[variant]()
    step = training_step(model, batch, tokens)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give back what building freed (fp32 before NF4)
    resident = resident_kib()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    for _ in range(steps):
        step()
    return {"resident_mib": resident / 1024, "peak_mib": high_water_mark_kib() / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--peak-steps", type=int, default=2)
    parser.add_argument("--peak-of", help=argparse.SUPPRESS)  # the child process of one variant
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if args.peak_of:
        print(json.dumps(peak_of(args.peak_of, args.batch, args.tokens, args.peak_steps)))
        return

    peaks = {}
    for variant in VARIANTS:
        command = [sys.executable, __file__, "--peak-of", variant, "--batch", str(args.batch)]
        command += ["--tokens", str(args.tokens), "--peak-steps", str(args.peak_steps)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        peaks[variant] = json.loads(output.strip().splitlines()[-1])
    models = {name: build() for name, build in VARIANTS.items()}
    sizes = {name: base_size(model) for name, model in models.items()}
    linears = {name: block_linear_bytes(model) for name, model in models.items()}
    steps = {name: training_step(model, args.batch, args.tokens) for name, model in models.items()}
    times = measure(steps, rounds=args.rounds, warmup=1)

    reference = "ours LoRA fp32"
    columns = {
        "base MiB": {n: f"{s / 2**20:.1f}" for n, s in sizes.items()},
        "× base bytes": {n: f"{s / sizes[reference]:.3f}" for n, s in sizes.items()},
        "× linears' bytes": {n: f"{linears[n] / linears[reference]:.3f}" for n in models},
        "peak MiB": {n: f"{p['peak_mib']:.0f}" for n, p in peaks.items()},
        "× peak": {n: f"{p['peak_mib'] / peaks[reference]['peak_mib']:.2f}" for n, p in peaks.items()},
    }
    lines = [
        "# The 4-bit base: bytes, peak memory and step time",
        "",
        f"`python benchmarks/memory.py --batch {args.batch} --tokens {args.tokens} --rounds {args.rounds}`"
        f" ({datetime.now(UTC):%Y-%m-%d}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__})",
        "",
        f"A training step (forward, backward, AdamW) on {args.batch} x {args.tokens} tokens, SmolLM2-135M's "
        "shape. Times: median of the interleaved rounds. Peak: resident high-water mark during "
        f"{args.peak_steps} steps, each variant in a fresh process.",
        "",
        *ratio_table(times, reference, decimals=0, columns=columns),
    ]
    publish(lines, args.output)


if __name__ == "__main__":
    main()

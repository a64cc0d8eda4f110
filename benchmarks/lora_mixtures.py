"""Mixtures of pre-trained LoRAs on the whole SmolLM2-135M shape, side by side with peft, as ratios.

    python benchmarks/lora_mixtures.py --output docs/benchmarks_mixtures.md

A randomly initialised model of SmolLM2-135M's shape (30 layers, 576 wide, MLP 1536) gets K peft
LoRAs (rank 8, every attention and MLP linear) saved by peft itself; then, in one process:
the frozen model (floor), peft with one of those LoRAs, peft's XLoraModel over all K, and our
X-LoRA and MeteoRA over the same K folders. A training step is forward + backward of the LM
loss (peft LoRA trains its LoRA; the mixtures train their gates); inference is one forward pass
without gradients. Rounds interleave the variants so machine drift hits all alike; reported are
the median ms, the interquartile range and the ratio of medians to peft single-LoRA.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import peft
import torch
from timing import publish
from torch import nn
from whole_model import LINEARS, SMOLLM2_135M, base_model, step_tables, time_models

from lightning_moe.adapters import AdapterRule, MeteoraConfig, XLoraConfig, inject


def write_peft_experts(folder: Path, count: int, rank: int) -> list[str]:
    folders = []
    for index in range(count):
        model = peft.get_peft_model(
            base_model(), peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LINEARS)
        )
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(std=0.01)
        model.save_pretrained(str(folder / f"expert_{index}"))
        folders.append(str(folder / f"expert_{index}"))
    return folders


def variants(experts: list[str]) -> dict[str, nn.Module]:
    frozen = base_model().requires_grad_(False)
    single = peft.PeftModel.from_pretrained(base_model(), experts[0], is_trainable=True)
    peft_xlora = peft.get_peft_model(
        base_model(),
        peft.XLoraConfig(
            task_type="CAUSAL_LM",
            hidden_size=SMOLLM2_135M.hidden_size,
            adapters={str(index): folder for index, folder in enumerate(experts)},
        ),
    )
    ours = {}
    for name, config in [
        ("ours X-LoRA", XLoraConfig(experts=experts)),
        ("ours MeteoRA top-2", MeteoraConfig(experts=experts, top_k=2)),
    ]:
        model = base_model()
        inject(model, [AdapterRule(targets=LINEARS, adapter=config)])
        ours[name] = model
    return {"frozen model": frozen, "peft LoRA (one)": single, "peft X-LoRA": peft_xlora} | ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        models = variants(write_peft_experts(Path(folder), args.experts, args.rank))
    training, inference = time_models(models, args.batch, args.tokens, args.rounds, args.warmup)

    lines = [
        "# LoRA mixtures benchmark",
        "",
        f"Command: `python benchmarks/lora_mixtures.py --experts {args.experts} --rank {args.rank} "
        f"--batch {args.batch} --tokens {args.tokens} --rounds {args.rounds}`",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"peft {peft.__version__}, {datetime.now(UTC):%Y-%m-%d}. SmolLM2-135M shape, {args.experts} LoRAs of "
        f"rank {args.rank} on all 7 linears of every layer, {args.batch} x {args.tokens} tokens, fp32.",
        "",
        *step_tables(training, inference, "peft LoRA (one)"),
    ]
    publish(lines, args.output)


if __name__ == "__main__":
    main()

"""Batched greedy decoding with a KV cache: the base model, peft's LoRA, our LoRA (unmerged and
merged), MoLE and MixLoRA, side by side, as ratios to the base model.

    python benchmarks/decode.py --output docs/benchmarks_decode.md
    python benchmarks/decode.py --profile "ours MoLE (E=8, top-1)"   # where its time goes

SmolLM2-135M's shape with random weights, eval mode; every variant's adapters are randomised
(a zero LoRA B would let nothing be skipped that real adapters need). Each call generates
`--new` tokens after a `--prompt`-token prompt for `--batch` sequences (no early stop: the end
token is disabled), so every variant decodes the same number of steps. Rank 8 (alpha 16) on the
attention projections; on the MLP one LoRA (LoRA variants), 8 experts top-1 (MoLE) or top-2
(MixLoRA) per linear.
"""

from __future__ import annotations

import argparse
import copy
import platform
from datetime import UTC, datetime
from pathlib import Path

import peft
import torch
from timing import measure, publish, ratio_table, tokens_per_second
from torch import nn
from transformers import GenerationConfig, LlamaForCausalLM
from whole_model import LINEARS, SMOLLM2_135M

from lightning_moe.adapters import AdapterRule, LoraConfig, MoEConfig, inject, merge_adapters

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
RANK, ALPHA, EXPERTS = 8, 16, 8


def base_model() -> nn.Module:
    torch.manual_seed(0)
    config = copy.deepcopy(SMOLLM2_135M)
    config.use_cache = True
    return LlamaForCausalLM(config).eval()


def randomised(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return model.requires_grad_(False)


def ours(mlp_adapter, merged: bool = False) -> nn.Module:
    model = base_model()
    inject(model, [AdapterRule(ATTENTION, LoraConfig(rank=RANK, alpha=ALPHA)), AdapterRule(MLP, mlp_adapter)])
    randomised(model)
    if merged:
        merge_adapters(model)
    return model


def variants() -> dict[str, nn.Module]:
    lora = LoraConfig(rank=RANK, alpha=ALPHA)
    peft_lora = peft.get_peft_model(
        base_model(), peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=LINEARS)
    )
    return {
        "base model": base_model(),
        "peft LoRA": randomised(peft_lora),
        "ours LoRA": ours(lora),
        "ours LoRA merged": ours(lora, merged=True),
        f"ours MoLE (E={EXPERTS}, top-1)": ours(
            MoEConfig(rank=RANK, alpha=ALPHA, num_experts=EXPERTS, top_k=1)
        ),
        f"ours MixLoRA (E={EXPERTS}, top-2)": ours(
            MoEConfig(rank=RANK, alpha=ALPHA, num_experts=EXPERTS, top_k=2)
        ),
    }


def decode_step(model: nn.Module, prompt: torch.Tensor, new_tokens: int):
    settings = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )

    def step() -> None:
        with torch.no_grad():
            model.generate(
                input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=settings
            )

    return step


def profile_table(step) -> str:
    """torch.profiler's operators of one call (after a warm-up call), by input shape."""
    step()
    with torch.profiler.profile(record_shapes=True) as profiler:
        step()
    averages = profiler.key_averages(group_by_input_shape=True)
    return averages.table(sort_by="self_cpu_time_total", row_limit=15, max_shapes_column_width=50)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument(
        "--profile", metavar="VARIANT", help="instead: where one call of VARIANT spends its time"
    )
    args = parser.parse_args()

    prompt = torch.randint(
        1, SMOLLM2_135M.vocab_size, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0)
    )
    models = variants()
    if args.profile:
        print(profile_table(decode_step(models[args.profile], prompt, args.new)))
        return
    times = measure(
        {name: decode_step(m, prompt, args.new) for name, m in models.items()}, args.rounds, args.warmup
    )
    generated = args.batch * args.new
    lines = [
        "# Decode benchmark: batched greedy generation with a KV cache",
        "",
        f"Command: `python benchmarks/decode.py --batch {args.batch} --prompt {args.prompt} --new {args.new} "
        f"--rounds {args.rounds}`",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"peft {peft.__version__}, {datetime.now(UTC):%Y-%m-%d}. SmolLM2-135M shape, fp32, "
        f"{args.batch} × ({args.prompt} prompt + {args.new} new) tokens per call, medians of {args.rounds} "
        "interleaved rounds (one call each).",
        "",
        *ratio_table(
            times, "base model", decimals=0, columns={"new tokens/s": tokens_per_second(times, generated)}
        ),
    ]
    publish(lines, args.output)


if __name__ == "__main__":
    main()

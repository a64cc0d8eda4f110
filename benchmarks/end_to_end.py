"""Whole-model training and inference cost of LoRA, MoLE and MixLoRA on SmolLM2-135M's shape:
ours, peft's LoRA and the `mixlora` package's MixLoRA in one process, as ratios to peft LoRA.

    python benchmarks/end_to_end.py --output docs/benchmarks_end_to_end.md

A randomly initialised model of SmolLM2-135M's shape (30 layers, 576 wide, MLP 1536). Every
adapted variant has rank-8 LoRA (alpha 16, dropout 0.05: the mixlora package refuses 0) on the
attention projections; on the MLP:
- peft LoRA / ours LoRA: one LoRA on each of gate, up and down;
- ours MoLE: 8 LoRA experts, top-1, behind a router per linear;
- ours MixLoRA: 8 LoRA experts, top-2, renormalised, behind a router per linear;
- mixlora package: 8 experts, top-2, one router per MLP; each expert is the whole MLP with its
  own LoRAs on gate, up and down (the package's design, same FLOP class as ours).
The frozen model is the floor: backward through every activation, no weight gradients.
"""

from __future__ import annotations

import argparse
import platform
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import peft
import torch
from timing import publish
from torch import nn
from whole_model import LINEARS, SMOLLM2_135M, base_model, step_tables, time_models

from lightning_moe.adapters import AdapterRule, LoraConfig, MoEConfig, inject

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
RANK, ALPHA, DROPOUT, EXPERTS = 8, 16, 0.05, 8


def ours(mlp_adapter) -> nn.Module:
    model = base_model()
    attention = LoraConfig(rank=RANK, alpha=ALPHA, dropout=DROPOUT)
    inject(model, [AdapterRule(ATTENTION, attention), AdapterRule(MLP, mlp_adapter)])
    return model


def moe(top_k: int) -> MoEConfig:
    return MoEConfig(rank=RANK, alpha=ALPHA, dropout=DROPOUT, num_experts=EXPERTS, top_k=top_k)


def mixlora_package() -> tuple[nn.Module, list[torch.Tensor]]:
    """The package's MixLoRA injected into the base, and its trainable tensors (its experts live
    in plain dicts, invisible to `model.parameters()`)."""
    from mixlora.config import MixLoraConfig
    from mixlora.model import inject_adapter_in_model

    config = MixLoraConfig.from_config(
        {
            "base_model_name_or_path": "smollm2-135m-shape",
            "task_type": "CAUSAL_LM",
            "peft_type": "MIXLORA",
            "routing_strategy": "mixlora",
            "r": RANK,
            "lora_alpha": ALPHA,
            "lora_dropout": DROPOUT,
            "target_modules": LINEARS,
            "num_experts": EXPERTS,
            "top_k": 2,
        }
    )
    config.dtype_ = torch.float32
    config.act_fn_ = SMOLLM2_135M.hidden_act  # the package fills it in only when it loads a hub model
    model = base_model().requires_grad_(False)
    generator = torch.Generator().manual_seed(1)
    hidden, inner = SMOLLM2_135M.hidden_size, SMOLLM2_135M.intermediate_size
    kv = hidden // SMOLLM2_135M.num_attention_heads * SMOLLM2_135M.num_key_value_heads
    shapes = {
        "q_proj": (hidden, hidden),
        "k_proj": (kv, hidden),
        "v_proj": (kv, hidden),
        "o_proj": (hidden, hidden),
    }
    shapes |= {"gate_proj": (inner, hidden), "up_proj": (inner, hidden), "down_proj": (hidden, inner)}

    def lora(prefix: str, name: str) -> dict[str, torch.Tensor]:
        out_features, in_features = shapes[name]
        return {
            f"{prefix}.lora_A.weight": torch.randn(RANK, in_features, generator=generator) * 0.02,
            f"{prefix}.lora_B.weight": torch.zeros(out_features, RANK),
        }

    weights = {}
    for layer in range(SMOLLM2_135M.num_hidden_layers):
        for name in ATTENTION:
            weights |= lora(f"mixlora.layers.{layer}.self_attn.{name}", name)
        weights[f"mixlora.layers.{layer}.mlp.moe_gate.weight"] = (
            torch.randn(EXPERTS, hidden, generator=generator) * 0.02
        )
        for name in MLP:
            for expert in range(EXPERTS):
                weights |= lora(f"mixlora.layers.{layer}.mlp.{name}.experts.{expert}", name)
    inject_adapter_in_model(model, config, weights)
    trainable = []
    for block in model.model.layers:
        moe_layer = block.mlp.mixlora_moes[config.adapter_name_]
        moe_layer.gate_.requires_grad_(True)
        trainable.append(moe_layer.gate_)
        loras = [getattr(block.self_attn, name) for name in ATTENTION] + list(moe_layer.experts_.values())
        for module in loras:
            for parameter in (module.lora_A.weight, module.lora_B.weight):
                parameter.requires_grad_(True)
                trainable.append(parameter)
    return model, trainable


def variants() -> dict[str, tuple[nn.Module, list[torch.Tensor] | None]]:
    peft_lora = peft.get_peft_model(
        base_model(), peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=LINEARS)
    )
    return {
        "frozen model": (base_model().requires_grad_(False), None),
        "peft LoRA": (peft_lora, None),
        "ours LoRA": (ours(LoraConfig(rank=RANK, alpha=ALPHA, dropout=DROPOUT)), None),
        f"ours MoLE (E={EXPERTS}, top-1)": (ours(moe(1)), None),
        f"ours MixLoRA (E={EXPERTS}, top-2)": (ours(moe(2)), None),
        f"mixlora package (E={EXPERTS}, top-2)": mixlora_package(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()

    models = variants()
    training, inference = time_models(
        {name: model for name, (model, _) in models.items()},
        args.batch,
        args.tokens,
        args.rounds,
        args.warmup,
        trainable={name: params for name, (_, params) in models.items() if params is not None},
    )
    tokens = args.batch * args.tokens
    lines = [
        "# Whole-model benchmark: LoRA, MoLE, MixLoRA",
        "",
        f"Command: `python benchmarks/end_to_end.py --batch {args.batch} --tokens {args.tokens} --rounds {args.rounds}`",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"peft {peft.__version__}, mixlora {version('mixlora')}, {datetime.now(UTC):%Y-%m-%d}. SmolLM2-135M "
        f"shape, {args.batch} x {args.tokens} tokens, fp32, medians of {args.rounds} interleaved rounds.",
        "",
        *step_tables(training, inference, "peft LoRA", tokens),
    ]
    publish(lines, args.output)


if __name__ == "__main__":
    main()

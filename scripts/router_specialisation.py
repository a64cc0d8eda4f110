"""Why MoLE's routers do not specialise: each candidate cause measured on a task where routing by
domain is provably useful.

    python scripts/router_specialisation.py --output docs/router_specialisation.md

The model is a frozen random tiny Llama (vocab 256, width 64, 2 blocks) with MoLE on its MLP
(4 rank-8 experts, top-1, dense backend) or a LoRA baseline. A sequence is a domain token
(254 or 255) followed by 16 random tokens x; the target at each x is (x + 1) mod 254 in one domain
and (x - 1) mod 254 in the other, so the same input token needs opposite outputs, told apart only
by the domain token the attention can see. Each variant trains with AdamW (lr 1e-3, batch 32)
and is measured on 256 held-out sequences at steps 150, 300 and 600 (`--checkpoints`): accuracy, the routers'
normalised entropy, the mutual information between domain and chosen expert per routed layer
(mean over the 6 layers, and the best layer; at most 1 bit), and how well a linear probe tells
the domain from the routed layers' inputs (the best layer; 0.5 is chance): what a router could
use at most.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn import functional as F

from lightning_moe.adapters import (
    AdapterRule,
    LoraConfig,
    MoEConfig,
    adapted_layers,
    inject,
    routing_statistics,
)
from lightning_moe.router_losses import RouterLoss, RouterLosses
from lightning_moe.routing_logging import GroupRouting, normalised_entropy
from lightning_moe.tasks.reasoning.causal_lm import build_causal_lm

LLAMA = {
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 64,
}
MLP = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
CONTENT, LENGTH, BATCH, LR = 254, 16, 32, 1e-3
CHECKPOINTS = (150, 300, 600)


@dataclass
class Variant:
    name: str
    adapter: dict = field(default_factory=dict)  # MoE options (kind lora: a LoRA baseline)
    balance: float = 0.01
    scope: str = "batch"
    router_lr_factor: float = 1.0
    batch: int = BATCH
    attention_lora: bool = False  # a rank-8 LoRA on q/k/v/o too, as the multimodal MoLE config has


VARIANTS = [
    Variant("LoRA r8", {"kind": "lora", "rank": 8}),
    Variant("LoRA r32", {"kind": "lora", "rank": 32}),
    Variant("MoLE (router lr = lr, balance 0.01 batch)"),
    Variant("MoLE, balance per sample (the multimodal config)", scope="sample"),
    Variant("MoLE, no balance loss", balance=0.0),
    Variant("MoLE, balance 0.1", balance=0.1),
    Variant("MoLE, router lr x10", router_lr_factor=10.0),
    Variant("MoLE, router lr x10, no balance loss", balance=0.0, router_lr_factor=10.0),
    Variant("MoLE, router input RMS-normalised", {"router_norm": True}),
    Variant("MoLE, router init std 0.5", {"router_init_std": 0.5}),
    Variant("MoLE, straight-through top-1", {"router_gradient": "straight_through"}),
    Variant("MoLE, router lr x10 + RMS-normalised input", {"router_norm": True}, router_lr_factor=10.0),
    Variant(
        "MoLE, router lr x10 + RMS-normalised input, batch 8",
        {"router_norm": True},
        router_lr_factor=10.0,
        batch=8,
    ),
    Variant("MoLE, top-2", {"top_k": 2}),
    Variant("MoLE, jitter noise 0.1", {"jitter_noise": 0.1}),
    Variant("MoLE + LoRA on attention", attention_lora=True),
    Variant(
        "MoLE + LoRA on attention, router lr x10 + RMS-normalised input",
        {"router_norm": True},
        router_lr_factor=10.0,
        attention_lora=True,
    ),
]
ATTENTION = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]


def conflict_batch(size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids [size, 1 + LENGTH], labels, domain [size]); the domain token's label is ignored."""
    domain = torch.randint(0, 2, (size,), generator=generator)
    tokens = torch.randint(0, CONTENT, (size, LENGTH), generator=generator)
    shift = torch.where(domain == 0, 1, -1)[:, None]
    labels = torch.cat([torch.full((size, 1), -100), (tokens + shift) % CONTENT], dim=1)
    return torch.cat([(CONTENT + domain)[:, None], tokens], dim=1), labels, domain


def build(variant: Variant, seed: int):
    model = build_causal_lm(None, LLAMA, 0, torch.float32)  # the same frozen base for every run
    torch.manual_seed(seed)
    options = dict(variant.adapter)
    if options.get("kind") == "lora":
        options.pop("kind")
        config = LoraConfig(alpha=2 * options["rank"], **options)
    else:
        config = MoEConfig(rank=8, alpha=16, **({"num_experts": 4, "top_k": 1, "backend": "dense"} | options))
    rules = [AdapterRule(targets=MLP, adapter=config)]
    if variant.attention_lora:
        rules.append(AdapterRule(targets=ATTENTION, adapter=LoraConfig(rank=8, alpha=16)))
    report = inject(model, rules)
    routers = [p for n, p in model.named_parameters() if p.requires_grad and ".router." in n]
    others = [p for n, p in model.named_parameters() if p.requires_grad and ".router." not in n]
    groups = [{"params": others}] + (
        [{"params": routers, "lr": LR * variant.router_lr_factor}] if routers else []
    )
    optimizer = torch.optim.AdamW(groups, lr=LR, weight_decay=0.0)
    return model, report.collector, optimizer


def loss_of(model, ids, labels) -> torch.Tensor:
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def probe_accuracy(inputs: torch.Tensor, domain: torch.Tensor) -> float:
    """How well a linear probe tells the domain from a layer's inputs at the content tokens:
    logistic regression fitted on half the sequences, scored on the other half (0.5 = chance)."""
    features = inputs[:, 1:].reshape(-1, inputs.shape[-1])
    labels = domain[:, None].expand(-1, inputs.shape[1] - 1).reshape(-1).float()
    features = (features - features.mean(0)) / features.std(0).clamp_min(1e-8)
    half = len(features) // 2
    weight = torch.zeros(features.shape[1] + 1, requires_grad=True)
    design = torch.cat([features, torch.ones(len(features), 1)], dim=1)
    optimizer = torch.optim.LBFGS([weight], max_iter=200)

    def closure():
        optimizer.zero_grad()
        loss = (
            F.binary_cross_entropy_with_logits(design[:half] @ weight, labels[:half])
            + 1e-3 * weight.square().sum()
        )
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return float(((design[half:] @ weight > 0).float() == labels[half:]).float().mean())


@torch.no_grad()
def measure(model, collector, held_out) -> dict[str, float]:
    ids, labels, domain = held_out
    model.eval()
    inputs = {}
    hooks = [
        layer.register_forward_hook(lambda module, args, output, name=name: inputs.__setitem__(name, args[0]))
        for name, layer in adapted_layers(model)
        if layer.config.kind == "moe"
    ]
    with collector.capture() as records:
        logits = model(input_ids=ids).logits
    for hook in hooks:
        hook.remove()
    model.train()
    real = labels != -100
    result = {"accuracy": float((logits.argmax(-1) == labels)[real].float().mean())}
    if inputs:
        result["probe"] = max(probe_accuracy(x, domain) for x in inputs.values())
    if records:
        grouping = GroupRouting("domain")
        mask = torch.ones_like(ids)
        grouping.update(records, mask, domain[:, None].expand_as(ids), ["+1", "-1"])
        information = grouping.layer_information()
        stats = routing_statistics(records, mask)
        result |= {
            "mi_mean": sum(information.values()) / len(information),
            "mi_best": max(information.values()),
            "entropy": sum(map(normalised_entropy, stats.values())) / len(stats),
        }
    return result


def run(
    variant: Variant, seed: int, checkpoints: tuple[int, ...] = CHECKPOINTS
) -> dict[int, dict[str, float]]:
    model, collector, optimizer = build(variant, seed)
    losses = RouterLosses(RouterLoss(balance_coef=variant.balance, balance_scope=variant.scope), model)
    data = torch.Generator().manual_seed(1000 + seed)
    held_out = conflict_batch(256, torch.Generator().manual_seed(7))
    measured = {}
    for step in range(1, max(checkpoints) + 1):
        ids, labels, _ = conflict_batch(variant.batch, data)
        with collector.capture() as records:
            loss = loss_of(model, ids, labels)
        for coefficient, value in losses.terms(records, None, None).values():
            loss = loss + coefficient * value
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step in checkpoints:
            measured[step] = measure(model, collector, held_out)
    return measured


def cell(results: list[dict], step: int, key: str) -> str:
    values = [r[step][key] for r in results if key in r[step]]
    if not values:
        return "—"
    return " / ".join(f"{v:.2f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--output", type=Path, default=None, help="write the markdown table here too")
    parser.add_argument(
        "--checkpoints", type=int, nargs="+", default=list(CHECKPOINTS), help="steps measured"
    )
    parser.add_argument("--only", default="", help="run only the variants whose name contains this")
    arguments = parser.parse_args()
    torch.set_num_threads(1)  # comparable per-run times whatever else runs
    checkpoints, last = tuple(arguments.checkpoints), max(arguments.checkpoints)
    lines = [
        f"| variant | MI mean, step {' · '.join(map(str, checkpoints))} | MI best layer, step {last} | entropy, {last} "
        f"| domain probe, {last} | accuracy, {last} | s/run |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant in [v for v in VARIANTS if arguments.only in v.name]:
        started = time.perf_counter()
        results = [run(variant, seed, checkpoints) for seed in arguments.seeds]
        seconds = (time.perf_counter() - started) / len(arguments.seeds)
        progress = " · ".join(cell(results, step, "mi_mean") for step in checkpoints)
        lines.append(
            f"| {variant.name} | {progress} | {cell(results, last, 'mi_best')} | {cell(results, last, 'entropy')} "
            f"| {cell(results, last, 'probe')} | {cell(results, last, 'accuracy')} | {seconds:.0f} |"
        )
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    command = " ".join(["python", *sys.argv])
    header = f"Seeds {arguments.seeds} (values per seed, separated by /). Command: `{command}`\n\n"
    if arguments.output:
        arguments.output.write_text(header + table + "\n")
    print(table)


if __name__ == "__main__":
    main()

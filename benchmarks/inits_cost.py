"""What the data-driven inits and the LoRA optimisers cost, on SmolLM2-135M's shape, side by side.

    python benchmarks/inits_cost.py --output docs/benchmarks_inits.md

1. Init passes: seconds of our EVA and LoRA-GA against peft's (`initialize_lora_eva_weights`,
   `preprocess_loraga` + `get_peft_model`) on the same model and the same 8 batches of 4 x 64
   random tokens; rank 8 on every attention and MLP linear. peft's EVA runs until its layers
   converge, cycling the batches; ours reads at most `init_batches` (here 8), so both get tau = 0.5
   and the batches each used are reported.
2. One training step (forward, backward, optimiser step) of plain LoRA r8 with AdamW, LoRA-Pro
   and ALLoRA at the learning rates of configs/inits/ (LoRA-Pro also at AdamW's 1e-3),
   interleaved rounds; the bytes of each optimiser's state; and how far the first two steps move
   the weights (the Frobenius norm of s B A over all layers), since LoRA-Pro steps in W's space.
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from timing import measure, publish, ratio_table
from whole_model import LINEARS, base_model

from lightning_moe.adapters import AdapterRule, LoraConfig, inject
from lightning_moe.adapters.data_init import initialise_from_data
from lightning_moe.lora_optimizers import ALLoRA, LoraPro, low_rank_pairs

RANK, ALPHA, BATCHES = 8, 16, 8


def batches(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, 49152, (4, 64), generator=generator) for _ in range(count)]
    return [{"input_ids": i, "labels": i} for i in ids]


def seconds(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def ours_init(init: str, data: list) -> tuple[float, str]:
    model = base_model()
    options = {"init": init, "init_batches": BATCHES} | ({"eva_tau": 0.5} if init == "eva" else {})
    inject(model, [AdapterRule(targets=LINEARS, adapter=LoraConfig(rank=RANK, alpha=ALPHA, **options))])
    report = {}

    def run():
        report["r"] = initialise_from_data(model, data, lambda batch: (model(**batch).loss, None))

    took = seconds(run)
    return took, report["r"].summary()


def peft_init(init: str, data: list) -> tuple[float, str]:
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model
    from peft.tuners.lora import EvaConfig, LoraGAConfig, eva, preprocess_loraga

    model = base_model()
    if init == "eva":
        config = PeftConfig(
            r=RANK,
            lora_alpha=ALPHA,
            target_modules=LINEARS,
            init_lora_weights="eva",
            eva_config=EvaConfig(tau=0.5),
        )
        peft_model = get_peft_model(model, config)
        used = []
        forward = lambda m, batch: used.append(1) or m(**batch)  # noqa: E731 (counts batches)
        took = seconds(
            lambda: eva.initialize_lora_eva_weights(
                peft_model, data, forward_fn=forward, show_progress_bar=False
            )
        )
        return took, f"{len(used) - 1} batches (one more for the input hashes)"
    config = PeftConfig(
        r=RANK,
        lora_alpha=ALPHA,
        target_modules=LINEARS,
        init_lora_weights="lora_ga",
        lora_ga_config=LoraGAConfig(),
    )

    def run():
        preprocess_loraga(model, config, lambda: [model(**batch).loss.backward() for batch in data])
        get_peft_model(model, config)

    return seconds(run), f"{len(data)} batches"


def weight_change(model) -> float:
    """The Frobenius norm of the update s B A over all adapted layers (how far W has moved)."""
    from lightning_moe.adapters import adapted_layers

    return (
        sum(float(layer.adapter.delta_weight().double().square().sum()) for _, layer in adapted_layers(model))
        ** 0.5
    )


OPTIMISERS = (
    ("AdamW", torch.optim.AdamW, 1e-3),
    ("LoRA-Pro", LoraPro, 2e-4),
    ("LoRA-Pro lr 1e-3", LoraPro, 1e-3),
    ("ALLoRA", ALLoRA, 1e-3),
)


def optimiser_steps(data: list, rounds: int, warmup: int) -> tuple[dict, dict[str, dict[str, str]]]:
    base = base_model()
    steps, optimizers, memory, moved = {}, {}, {}, {}
    for name, factory, lr in OPTIMISERS:
        model = copy.deepcopy(base)
        alpha = RANK if name == "ALLoRA" else ALPHA  # ALLoRA: scaling 1
        inject(model, [AdapterRule(targets=LINEARS, adapter=LoraConfig(rank=RANK, alpha=alpha))])
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = factory(parameters, lr=lr, weight_decay=0.0)
        if hasattr(optimizer, "bind_low_rank_pairs"):
            optimizer.bind_low_rank_pairs(low_rank_pairs(model))

        def step(model=model, optimizer=optimizer):
            optimizer.zero_grad()
            model(**data[0]).loss.backward()
            optimizer.step()

        for _ in range(2):  # B = 0 at the start, so the second step is the first that moves A too
            step()
        moved[name] = f"{weight_change(model):.3g}"
        steps[name], optimizers[name] = step, optimizer
    times = measure(steps, rounds, warmup)
    for name, optimizer in optimizers.items():
        state = sum(
            t.numel() * t.element_size()
            for s in optimizer.state.values()
            for t in s.values()
            if torch.is_tensor(t)
        )
        memory[name] = f"{state / 2**20:.1f}"
    return times, {"optimiser state MiB": memory, "‖ΔW‖ after 2 steps": moved}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = batches(BATCHES)
    lines = [
        "# Cost of the data-driven inits and the LoRA optimisers",
        "",
        f"`python benchmarks/inits_cost.py` on {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"2 threads, {datetime.now(UTC):%Y-%m-%d}; SmolLM2-135M's shape (random weights), LoRA r{RANK} on {', '.join(LINEARS)}.",
        "",
        "## Init passes (seconds, one run each)",
        "",
        "| init | ours s | peft s | ours / peft | ours | peft |",
        "|---|---:|---:|---:|---|---|",
    ]
    for init in ("eva", "lora_ga"):
        ours_s, ours_note = ours_init(init, data)
        peft_s, peft_note = peft_init(init, data)
        lines.append(
            f"| {init} | {ours_s:.1f} | {peft_s:.1f} | {ours_s / peft_s:.2f} | {ours_note} | {peft_note} |"
        )
    times, columns = optimiser_steps(data, args.rounds, args.warmup)
    lines += ["", "## One training step, batch 4 x 64 tokens", "", *ratio_table(times, "AdamW", 0, columns)]
    publish(lines, args.output)


if __name__ == "__main__":
    main()

"""Which expert each task's tokens go to: mean gate probability per (task, expert) of a saved
X-LoRA / MeteoRA adapter on the test split of a mixture config, as a markdown table.

    python scripts/mixture_routing.py configs/mixtures/xlora_smollm2.yaml runs/mixture_results/xlora/fit/adapter

Averaged over every gated layer and over the answer tokens (the completion the model is trained
to write) of each task's problems; `--tokens all` averages over prompt and answer tokens.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch
import yaml

from lightning_moe.adapters import load_adapter, read_adapter_config, routing_collector
from lightning_moe.data.collate import IGNORE_INDEX
from lightning_moe.data.math_problems import MathDataModule
from lightning_moe.tasks.reasoning.causal_lm import build_causal_lm


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="the mixture config the adapter was trained with")
    parser.add_argument("adapter", help="the saved mixture adapter folder")
    parser.add_argument("--tokens", choices=["answer", "all"], default="answer")
    args = parser.parse_args()

    config = yaml.safe_load(Path(args.config).read_text())
    data = MathDataModule(**config["data"]["init_args"])
    data.setup()
    model = build_causal_lm(config["model"]["init_args"]["model"], None, 0, torch.float32).eval()
    load_adapter(model, args.adapter)
    mixture = read_adapter_config(args.adapter)["rules"][0]["adapter"]

    sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(len(mixture["experts"])))
    counts: dict[str, float] = defaultdict(float)
    for batch in data.test_dataloader():
        with routing_collector(model).capture() as records:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        mask = (
            (batch["labels"] != IGNORE_INDEX) if args.tokens == "answer" else batch["attention_mask"].bool()
        )
        mask = mask.float()
        probs = torch.stack([r.logits.softmax(-1) for r in records.values()]).mean(0)  # logits are tempered
        for row, domain in enumerate(batch["domain"]):
            sums[domain] += (probs[row] * mask[row, :, None]).sum(0)
            counts[domain] += float(mask[row].sum())

    experts = [folder.split("/")[-2] for folder in mixture["experts"]]
    print("| task \\ expert | " + " | ".join(experts) + " |")
    print("|---|" + "---:|" * len(experts))
    for domain, total in sums.items():
        cells = " | ".join(f"{100 * value:.0f}" for value in (total / counts[domain]).tolist())
        print(f"| {domain} | {cells} |")


if __name__ == "__main__":
    main()

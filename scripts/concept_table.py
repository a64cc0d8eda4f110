"""Concept-presence tables of the composed concept LoRAs, read from the prediction files that
`predict` writes under runs/diffusion/compose/<prompt set>/<method>/predictions.jsonl.

    python scripts/concept_table.py [--root runs/diffusion/compose] [--figure docs/images/x.png]

Table 1: each model alone on prompts of its own concept (single/<model>). Table 2: per method,
the share of images showing every prompted concept, per prompt set, the mean over the 2-concept
sets, and the sampling cost per image. Table 3: per method and prompt set, how often each
prompted concept shows on its own ("object" is the digit, or the clothing item of the
inverted + framed set), and how often the 3-concept set shows a style it did not ask for.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean

import numpy as np
from PIL import Image

TWO_CONCEPTS = {
    "digit_inverted": "digit + inverted",
    "digit_framed": "digit + framed",
    "inverted_framed": "inverted + framed",
}
THREE_CONCEPTS = "three"
METHODS = {
    "base": "base UNet, no LoRA",
    "merge": "merge",
    "switch": "switch",
    "composite": "composite",
    "gate": "learned gate",
}


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def rate(records: list[dict], field: str) -> float:
    return 100 * mean(float(record[field]) for record in records)


SINGLE = {
    "base": ("base UNet", '"a sneaker"'),
    "digit": ("digit LoRA", '"a handwritten digit 3"'),
    "inverted": ("inverted LoRA", '"a sneaker, inverted"'),
    "framed": ("framed LoRA", '"a sneaker, framed"'),
}


def print_single_concepts(folder: Path) -> None:
    fields = {"object_present": "object", "inverted_present": "inverted", "framed_present": "framed"}
    print("| model | prompts like | " + " | ".join(fields.values()) + " | s / image |")
    print("|---|---|" + "---:|" * (len(fields) + 1))
    for model, (label, example) in SINGLE.items():
        records = read_records(folder / model / "predictions.jsonl")
        cells = [f"{rate(records, field):.0f}" if field in records[0] else "" for field in fields]
        cost = mean(record["seconds_per_image"] for record in records)
        print(f"| {label} | {example} | " + " | ".join(cells) + f" | {cost:.3f} |")
    print()


def method_rows_figure(folder: Path, target: Path, cell: int = 34) -> None:
    """The first sample of every prompt (the first column of each predictions.png, whose rows are
    prompts), one row per method, in METHODS order."""
    rows = []
    for method in METHODS:
        grid = np.asarray(Image.open(folder / method / "predictions.png").convert("L"))
        column = grid[:, : cell + 2]  # 2 px padding on both sides of the first image
        cells = [column[r * cell : (r + 1) * cell + 2] for r in range(grid.shape[0] // cell)]
        rows.append(np.concatenate(cells, axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs/diffusion/compose", type=Path)
    parser.add_argument("--figure", type=Path, help="also write the 3-concept samples, one row per method")
    args = parser.parse_args()
    if args.figure:
        method_rows_figure(args.root / THREE_CONCEPTS, args.figure)
    print_single_concepts(args.root / "single")
    runs = {
        (prompt_set, method): read_records(args.root / prompt_set / method / "predictions.jsonl")
        for prompt_set in [*TWO_CONCEPTS, THREE_CONCEPTS]
        for method in METHODS
    }
    print(
        "| method | " + " | ".join(TWO_CONCEPTS.values()) + " | mean, 2 concepts | digit + inverted + framed "
        "| s / image, 2 concepts | s / image, 3 concepts |"
    )
    print("|---|" + "---:|" * (len(TWO_CONCEPTS) + 4))
    for method, label in METHODS.items():
        two = [rate(runs[prompt_set, method], "all_present") for prompt_set in TWO_CONCEPTS]
        three = runs[THREE_CONCEPTS, method]
        cost_two = mean(mean(r["seconds_per_image"] for r in runs[s, method]) for s in TWO_CONCEPTS)
        cost_three = mean(r["seconds_per_image"] for r in three)
        cells = [f"{value:.0f}" for value in two] + [f"{mean(two):.1f}", f"{rate(three, 'all_present'):.0f}"]
        print(f"| {label} | " + " | ".join(cells) + f" | {cost_two:.3f} | {cost_three:.3f} |")
    print()
    print_concept_rates(runs)


def print_concept_rates(runs: dict[tuple[str, str], list[dict]]) -> None:
    """Per prompt set and method, how often each prompted concept shows on its own."""
    names = {"object_present": "object", "inverted_present": "inverted", "framed_present": "framed"}
    columns = [
        (prompt_set, field)
        for prompt_set in [*TWO_CONCEPTS, THREE_CONCEPTS]
        for field in names
        if field in runs[prompt_set, "base"][0]
    ]
    labels = [f"{TWO_CONCEPTS.get(s, 'digit + inverted + framed')}: {names[f]}" for s, f in columns]
    print("| method | " + " | ".join(labels) + " | an unprompted style, 3 concepts |")
    print("|---|" + "---:|" * (len(columns) + 1))
    for method, label in METHODS.items():
        cells = [f"{rate(runs[prompt_set, method], field):.0f}" for prompt_set, field in columns]
        cells.append(f"{rate(runs[THREE_CONCEPTS, method], 'unprompted_style'):.0f}")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

"""Concept-presence tables of the composed canvas LoRAs, read from the prediction files that
`predict` writes under runs/diffusion/compose_canvas/<prompt set>/<method>/predictions.jsonl.

    python scripts/canvas_table.py [--root runs/diffusion/compose_canvas] [--judge J]
        [--second-judge J2] [--figures docs/images]

First the judge on held-out tiles (how often it names each object) and on real held-out
canvases (a digit or a textile swatch in one slot, a Fashion-MNIST object in the other, framed or
not: how often it finds each concept). Then each LoRA alone, and the base, on prompts of that
LoRA's concept (single/<lora>, single/base_<lora>). Then per prompt set and method (and the
parts of CLoRA and LoRA-Composer), the share of canvases showing every LoRA concept where the
prompt put it, with its Wilson 95 % interval, how often each concept shows on its own, and the
sampling cost per image. With --second-judge, every composition judged again by it, from the
grids. With --figures, one figure per prompt set (canvas_<set>.png): the first row of every
method's grid.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean

import matplotlib
import numpy as np
import torch
from PIL import Image
from scipy.stats import binomtest

from lightning_moe.data.canvas import CANVAS_STYLES, SLOTS, CanvasDataModule
from lightning_moe.data.captioned_images import StyledImageDataModule
from lightning_moe.tasks.diffusion.concept_judge import load_concept_judge
from lightning_moe.tasks.diffusion.presence import INK_LEVEL, MIN_INK, canvas_presence

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402

PROMPT_SETS = {
    "digit_textile": "digit + textile",
    "digit_framed": "digit + framed",
    "textile_framed": "textile + framed",
    "three": "digit + textile + framed",
}
METHODS = {
    "base": "base UNet, no LoRA",
    "merge": "merge",
    "switch": "switch",
    "composite": "composite",
    "clora": "CLoRA",
    "lora_composer": "LoRA-Composer",
    "lora_composer_no_isolation": "LoRA-Composer without the isolation",
}
# the parts of CLoRA and LoRA-Composer, each left out in turn (digit + textile only)
PARTS = {
    "clora_no_guidance": "CLoRA without the latent steps (masks from the maps only)",
    "lora_composer_no_guidance": "LoRA-Composer without the latent steps",
    "lora_composer_no_reinitialisation": "LoRA-Composer without the re-initialisation",
} | {
    f"lora_composer_no_isolation_step_{step}": f"LoRA-Composer without the isolation, step size {step}"
    for step in ("0.1", "0.25", "1.0")
}
CONCEPT_WORDS = {"digit": "handwritten digit", "textile": "textile swatch"}
LORAS = ("digit", "textile", "framed")


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def rate_with_interval(hits: list[bool]) -> str:
    """The percentage and its Wilson 95 % interval, as "45 [30, 61]"."""
    low, high = binomtest(sum(hits), len(hits)).proportion_ci(method="wilson")
    return f"{100 * mean(hits):.0f} [{100 * low:.0f}, {100 * high:.0f}]"


def concept_hits(record: dict, concept: str) -> bool:
    """Whether the canvas shows `concept` (an object LoRA's object in the slot the prompt gave
    it, or the frame)."""
    if concept == "framed":
        return record["framed_present"]
    words = CONCEPT_WORDS[concept]
    return all(record[f"{slot}_present"] for slot, name in record["slots"].items() if name == words)


def set_concepts(prompt_set: str) -> list[str]:
    return list(LORAS) if prompt_set == "three" else prompt_set.split("_")


def real_canvas_records(judge, concept_source: str, styles: list[str], count: int = 200) -> list[dict]:
    """The judge's records of `count` real held-out canvases with a `concept_source` object."""
    data = CanvasDataModule("fashion-mnist", concept_source, styles, train_size=1, val_size=count)
    data.setup("validate")
    canvases = data.splits["val"]
    slots, layouts = [], []
    for index in range(count):
        names = {slot: tiles.names[row] for slot, (tiles, row) in canvases.layout(index).items()}
        concept = canvases.concept.names[0]
        slots.append(names)
        layouts.append(
            {concept: next(slot for slot in SLOTS if names[slot] == concept)}
            | dict.fromkeys(styles, "border")
        )
    with torch.no_grad():
        images = torch.stack([canvases[index]["image"] for index in range(count)])
        return canvas_presence(judge, images, slots, [list(styles)] * count, layouts)


def print_judges_on_tiles(judge_paths: list[Path]) -> None:
    """How often each judge names the object of a held-out 24 px tile, over all and per object,
    and how much ink real tiles have (a slot with less than MIN_INK holds nothing)."""
    data = StyledImageDataModule(["fashion-mnist", "mnist-5k", "textile"], [], image_size=24, val_size=1000)
    data.setup("validate")
    tiles = data.splits["val"]
    for judge_path in judge_paths:
        judge = load_concept_judge(judge_path)
        with torch.no_grad():
            named = torch.cat(
                [judge.judge(tiles.images[i : i + 500])["object"] for i in range(0, len(tiles), 500)]
            )
        right = (named == tiles.objects).float()
        per_object = [
            f"{name} {100 * right[tiles.objects == k].mean():.0f}"
            for k, name in enumerate(judge.object_names)
        ]
        print(
            f"{judge_path.name} on {len(tiles)} held-out tiles: {100 * right.mean():.1f} % right; "
            + ", ".join(per_object)
        )
    ink = (tiles.images > INK_LEVEL).flatten(1).float().mean(-1)
    names = tiles.object_names
    groups = {
        "Fashion-MNIST": tiles.objects < names.index("handwritten digit"),
        "MNIST-5k": tiles.objects == names.index("handwritten digit"),
        "textile": tiles.objects == names.index("textile swatch"),
    }
    shares = [f"{source} {100 * ink[chosen].quantile(0.01):.1f} %" for source, chosen in groups.items()]
    print(
        f"ink share of real tiles, 1st percentile: {', '.join(shares)} (a slot needs {100 * MIN_INK:.0f} %)"
    )
    print()


def print_judge_on_real_canvases(judge_path: Path) -> None:
    judge = load_concept_judge(judge_path)
    print("| real canvases | concept in its slot | frame seen | all present |")
    print("|---|---:|---:|---:|")
    for source, lora in (("mnist-5k", "digit"), ("textile", "textile")):
        for styles in ([], ["framed"]):
            records = real_canvas_records(judge, source, styles)
            found = mean(concept_hits(record, lora) for record in records)
            framed = mean("framed" in record["judged_styles"] for record in records)
            all_present = mean(record["all_present"] for record in records)
            label = f"{lora}{', framed' if styles else ''}"
            print(f"| {label} | {100 * found:.0f} | {100 * framed:.0f} | {100 * all_present:.0f} |")
    print()


def print_single_concepts(folder: Path) -> None:
    print("| LoRA | prompts like | base UNet | the LoRA alone | s / image (LoRA) |")
    print("|---|---|---:|---:|---:|")
    for lora in LORAS:
        alone = read_records(folder / lora / "predictions.jsonl")
        base = read_records(folder / f"base_{lora}" / "predictions.jsonl")
        cells = [rate_with_interval([concept_hits(r, lora) for r in records]) for records in (base, alone)]
        cost = mean(record["seconds_per_image"] for record in alone)
        print(f'| {lora} | "{alone[0]["prompt"]}" | ' + " | ".join(cells) + f" | {cost:.3f} |")
    print()


def print_compositions(root: Path) -> None:
    for prompt_set, label in PROMPT_SETS.items():
        if not (root / prompt_set).is_dir():
            continue
        concepts = set_concepts(prompt_set)
        print(f"**{label}**\n")
        print("| method | all present, % [95 % CI] | " + " | ".join(concepts) + " | s / image |")
        print("|---|---:|" + "---:|" * (len(concepts) + 1))
        for method, name in (METHODS | PARTS).items():
            path = root / prompt_set / method / "predictions.jsonl"
            if not path.is_file():
                continue
            records = read_records(path)
            cells = [rate_with_interval([record["all_present"] for record in records])]
            cells += [f"{100 * mean(concept_hits(r, concept) for r in records):.0f}" for concept in concepts]
            cost = mean(record["seconds_per_image"] for record in records)
            print(f"| {name} | " + " | ".join(cells) + f" | {cost:.3f} |")
        print()


def grid_canvases(path: Path, count: int, columns: int = 8) -> torch.Tensor:
    """The first `count` canvases of a predictions.png (torchvision's make_grid, 2 px padding),
    back in [-1, 1]: [count, 1, H, 2H]."""
    grid = torch.from_numpy(np.asarray(Image.open(path).convert("L")).copy()).float() / 255
    width = (grid.shape[1] - 2) // min(columns, count) - 2
    height = width // 2
    cells = []
    for index in range(count):
        row, column = divmod(index, columns)
        top, left = 2 + row * (height + 2), 2 + column * (width + 2)
        cells.append(grid[top : top + height, left : left + width])
    return torch.stack(cells)[:, None] * 2 - 1


def rejudged(judge, folder: Path) -> tuple[list[dict], list[dict]]:
    """A run's records, and the records another judge gives its images (read from its grid)."""
    records = read_records(folder / "predictions.jsonl")
    styles = [[style for style in CANVAS_STYLES if f"{style}_present" in record] for record in records]
    layouts = [
        {name: slot for slot, name in record["slots"].items() if name in CONCEPT_WORDS.values()}
        | dict.fromkeys(prompted, "border")
        for record, prompted in zip(records, styles, strict=True)
    ]
    canvases = grid_canvases(folder / "predictions.png", len(records))
    with torch.no_grad():
        again = canvas_presence(judge, canvases, [r["slots"] for r in records], styles, layouts)
    return records, again


def print_judge_agreement(root: Path, judge_path: Path, other_path: Path) -> None:
    """All-present per method under the judge of the runs, that judge again from the grids (a
    check of the reading), and a second judge; and how often the two name the same object in a
    concept's slot."""
    judges = [load_concept_judge(judge_path), load_concept_judge(other_path)]
    print(
        f"| prompt set | method | {judge_path.name} | the same, from the grid | {other_path.name} | same object in a concept slot |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for prompt_set, label in PROMPT_SETS.items():
        for method, name in METHODS.items():
            folder = root / prompt_set / method
            if method == "base" or not (folder / "predictions.png").is_file():
                continue
            (records, again), (_, other) = (rejudged(judge, folder) for judge in judges)
            concept_slots = [
                (row, slot)
                for row, record in enumerate(records)
                for slot, words in record["slots"].items()
                if words in CONCEPT_WORDS.values()
            ]
            same = mean(
                again[row]["judged_slots"][slot] == other[row]["judged_slots"][slot]
                for row, slot in concept_slots
            )
            cells = [rate_with_interval([r["all_present"] for r in rows]) for rows in (records, again, other)]
            print(f"| {label} | {name} | " + " | ".join(cells) + f" | {100 * same:.0f} |")
    print()


def method_rows_figure(folder: Path, target: Path, columns: int = 8) -> None:
    """The first grid row of each method's predictions.png (its first `columns` canvases), one
    labelled row per method, in METHODS order."""
    methods = [method for method in METHODS if (folder / method / "predictions.png").is_file()]
    figure = Figure(figsize=(columns * 1.2, len(methods) * 0.9))
    axes = figure.subplots(len(methods), 1, squeeze=False)
    for axis, method in zip(axes[:, 0], methods, strict=True):
        grid = np.asarray(Image.open(folder / method / "predictions.png").convert("L"))
        height = ((grid.shape[1] - 2) // columns - 2) // 2  # cells are H x 2H with 2 px padding
        axis.imshow(grid[: height + 4], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        axis.set_xticks([]), axis.set_yticks([])
        axis.set_title(METHODS[method], loc="left", fontsize=8)
    figure.tight_layout()
    figure.savefig(target, dpi=150)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs/diffusion/compose_canvas", type=Path)
    parser.add_argument("--judge", default="runs/judges/canvas_judge", type=Path)
    parser.add_argument("--second-judge", type=Path, help="re-judge every composition with this judge too")
    parser.add_argument("--figures", type=Path, help="write each prompt set's method rows in this folder")
    arguments = parser.parse_args()
    print_judges_on_tiles([arguments.judge] + ([arguments.second_judge] if arguments.second_judge else []))
    print_judge_on_real_canvases(arguments.judge)
    print_single_concepts(arguments.root / "single")
    print_compositions(arguments.root)
    if arguments.second_judge is not None:
        print_judge_agreement(arguments.root, arguments.judge, arguments.second_judge)
    if arguments.figures is not None:
        for prompt_set in PROMPT_SETS:
            method_rows_figure(arguments.root / prompt_set, arguments.figures / f"canvas_{prompt_set}.png")


if __name__ == "__main__":
    main()

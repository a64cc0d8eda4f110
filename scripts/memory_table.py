"""The results table of docs/memory.md, from the runs of scripts/memory_results.sh.

    python scripts/memory_table.py runs/memory

Each run's TensorBoard events give the validation scores before training (the sanity check, on
that run's own base: fp32, NF4, Q + L or pruned) and after; the LoRAM rows add the full model
with the recovered adapter (`<name>_full`), the L4Q row the merged quantised model from its
codes (`quantized/compare.json`). Seeds are averaged (mean, and ± half the range with 2 seeds).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

METRICS = ["val/strict_match", "val/flexible_match", "val/loss"]
ROWS = [
    ("LoRA", "fp32 base", "lora_fp32"),
    ("LoRA", "NF4 base", "lora_nf4"),
    ("LoRA", "NF4 base and embeddings", "nf4_embeddings"),
    ("LoRA", "LQ-LoRA (NF4 Q + L)", "lq_lora"),
    ("LoRA", "LQ-LoRA, lr 3e-4", "lq_lora_lr3e-4"),
    ("LoRA", "L4Q, as trained", "l4q"),
    ("LoRA", "LoRAM 50 % (magnitude), pruned", "loram_50"),
    ("LoRA", "LoRAM 50 % (magnitude), full model + recovered", "loram_50_full"),
    ("LoRA", "LoRAM 50 % (calibration), pruned", "loram_50_calibration"),
    ("LoRA", "LoRAM 50 % (calibration), full model + recovered", "loram_50_calibration_full"),
    ("LoRA", "LoRAM 30 % (calibration), pruned", "loram_30"),
    ("LoRA", "LoRAM 30 %, full model + recovered", "loram_30_full"),
    ("MoLE", "fp32 base", "mole_fp32"),
    ("MoLE", "NF4 base", "mole_nf4"),
    ("MoLE", "NF4 + LQ-LoRA attention", "lq_mole"),
    ("MoLE", "LoRAM 50 %, pruned", "mole_loram_50"),
    ("MoLE", "LoRAM 50 %, full model + recovered", "mole_loram_50_full"),
]


def first_and_last(run: Path) -> tuple[dict[str, float], dict[str, float]]:
    events = EventAccumulator(str(run)).Reload()
    tags = set(events.Tags()["scalars"])
    series = {tag: events.Scalars(tag) for tag in METRICS if tag in tags}
    return {t: s[0].value for t, s in series.items()}, {t: s[-1].value for t, s in series.items()}


def summarise(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.mean(values)
    spread = f" ± {(max(values) - min(values)) / 2:.3f}" if len(values) > 1 else ""
    return f"{mean:.3f}{spread}"


def table(root: Path) -> list[str]:
    lines = [
        "| adapters | base | seeds | " + " | ".join(f"{m} before → after" for m in METRICS) + " |",
        "|---|---|---:|" + "---:|" * len(METRICS),
    ]
    rows = list(ROWS)
    rows.insert(6, ("LoRA", "L4Q, merged and quantised (from the codes)", "l4q/quantized"))
    for adapters, base, name in rows:
        if name == "l4q/quantized":
            results = [
                json.loads(path.read_text())["merged and quantised (from the export)"]
                for path in sorted((root / "l4q").glob("s*/quantized/compare.json"))
            ]
            befores = [{} for _ in results]
        else:
            runs = sorted((root / name).glob("s*"))
            pairs = [first_and_last(run) for run in runs if list(run.glob("events.*"))]
            pairs = [pair for pair in pairs if pair[1]]  # a run still before its first validation
            befores, results = [p[0] for p in pairs], [p[1] for p in pairs]
        if not results:
            continue
        cells = []
        for metric in METRICS:
            before = summarise([b[metric] for b in befores if metric in b])
            after = summarise([r[metric] for r in results if metric in r])
            cells.append(after if before in ("-", after) or name.endswith("_full") else f"{before} → {after}")
        lines.append(f"| {adapters} | {base} | {len(results)} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    print("\n".join(table(parser.parse_args().root)))


if __name__ == "__main__":
    main()

"""`python -m lightning_moe inspect ADAPTER_DIR`: what a saved adapter folder holds.

Without a model it reads only the folder: each rule's kind, options, layers and trainable
parameters, the extra weight files (e.g. a projector), the base fingerprint, and the expert
folders a mixture references with their recorded and current hashes. `--base CONFIG` builds the
base model of a fit config (the run's own `config.yaml` by default) and checks the fingerprint
against it; `--data` then also routes a few batches of that config's validation data through
the adapted model and reports per-layer routing statistics. `--json` prints the same as JSON.
`inspect intruders ADAPTER_DIR` counts intruder dimensions instead (lightning_moe/intruders.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ActionYesNo, ArgumentParser
from rich.console import Console
from rich.table import Table

from lightning_moe.adapted_task import adapted_task
from lightning_moe.adapters.adapter_folder import (
    WEIGHTS_FILE,
    describe_storage,
    folder_sha256,
    read_adapter_config,
    read_rules,
    read_weights,
)
from lightning_moe.adapters.aux_losses import LayerRoutingStats, routing_statistics
from lightning_moe.adapters.files import read_safetensors
from lightning_moe.errors import UserInputError
from lightning_moe.routing_logging import normalised_entropy, routing_summary, short_names, summary_line


def describe_folder(folder: Path) -> dict[str, Any]:
    """Everything the folder itself says, as plain data (see the module docstring)."""
    config = read_adapter_config(folder)
    rules = read_rules(folder, config)
    weights = read_weights(folder)
    modules: dict[str, str] = config.get("modules", {})
    described = []
    for index, rule in enumerate(rules):
        layers = [name for name in modules if rule.matches(name)]
        options = dataclasses.asdict(rule.config)
        described.append(
            {
                "rule": index,
                "kind": rule.config.kind,
                "targets": list(rule.targets),
                "options": {
                    key: value for key, value in options.items() if key not in ("experts", "expert_sha256")
                },
                "layers": layers,
                "parameters": sum(
                    tensor.numel()
                    for key, tensor in weights.items()
                    if any(key.startswith(f"{name}.") for name in layers)
                ),
                "experts": _experts(options),
            }
        )
    fingerprint = config.get("fingerprint", {})
    extra = {
        path.name: sum(t.numel() for t in read_safetensors(path).values())
        for path in sorted(folder.glob("*.safetensors"))
        if path.name != WEIGHTS_FILE
    }
    return {
        "folder": str(folder),
        "sha256": folder_sha256(folder),
        "base_model": config.get("base_model", ""),
        "format_version": config.get("version"),
        "rules": described,
        "extra_weights": extra,
        "trainable_parameters": sum(t.numel() for t in weights.values()) + sum(extra.values()),
        "fingerprint": {
            "layers": len(fingerprint),
            "digest": hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16],
            "storage": sorted({describe_storage(prints) for prints in fingerprint.values()}),
            "reconstruction_error": {
                name: prints["relative_error"]
                for name, prints in fingerprint.items()
                if "relative_error" in prints
            },
        },
    }


def _experts(options: dict[str, Any]) -> list[dict[str, Any]]:
    """The expert folders a LoRA mixture names, with the hash it recorded and the one they have now."""
    recorded = options.get("expert_sha256") or []
    experts = []
    for index, path in enumerate(options.get("experts") or []):
        folder = Path(path)
        current = folder_sha256(folder) if (folder / WEIGHTS_FILE).is_file() else None
        expected = recorded[index] if index < len(recorded) else None
        status = (
            "missing"
            if current is None
            else "not recorded"
            if expected is None
            else "matches"
            if current == expected
            else "changed"
        )
        experts.append(
            {"index": index, "path": path, "recorded_sha256": expected, "sha256": current, "status": status}
        )
    return experts


@torch.no_grad()
def routing_on_data(task, datamodule, batches: int) -> dict[str, LayerRoutingStats]:
    """Routing statistics of each routed layer, averaged over the first `batches` validation batches."""
    datamodule.setup("validate")
    task.eval()
    per_layer: dict[str, list[LayerRoutingStats]] = {}
    for index, batch in enumerate(datamodule.val_dataloader()):
        if index == batches:
            break
        with task.injection.collector.capture() as records:
            _, mask = task.task_loss(batch)
        for name, stats in routing_statistics(records, mask).items():
            per_layer.setdefault(name, []).append(stats)
    if not per_layer:
        raise UserInputError("no routed layer reported routing on these batches (is the adapter a mixture?)")
    merged = {}
    for name, runs in per_layer.items():
        load = torch.stack([s.load for s in runs]).mean(dim=0)
        entropy = sum(s.entropy for s in runs) / len(runs)
        merged[name] = LayerRoutingStats(load=load, entropy=entropy, dead_experts=int((load == 0).sum()))
    return merged


def routing_report(stats: dict[str, LayerRoutingStats], batches: int) -> dict[str, Any]:
    return {
        "batches": batches,
        "summary": routing_summary(stats),
        "layers": {
            name: {"load": s.load.tolist(), "entropy": normalised_entropy(s), "dead_experts": s.dead_experts}
            for name, s in stats.items()
        },
    }


def print_report(report: dict[str, Any], console: Console) -> None:
    console.print(f"[bold]{report['folder']}[/bold]  (adapter format {report['format_version']})")
    console.print(
        f"base model: {report['base_model'] or 'not named'}; fingerprint of {report['fingerprint']['layers']} "
        f"base layers, digest {report['fingerprint']['digest']}; folder sha256 {report['sha256'][:16]}"
    )
    errors = report["fingerprint"]["reconstruction_error"]
    if errors:
        worst = max(errors, key=errors.get)
        console.print(
            f"base stored as {', '.join(report['fingerprint']['storage'])}: relative reconstruction error "
            f"||W - W_q|| / ||W|| mean {sum(errors.values()) / len(errors):.4f}, max {errors[worst]:.4f} ({worst})"
        )
    rules = Table(title="rules", title_justify="left")
    for column in ("#", "kind", "targets", "layers", "options", "parameters"):
        rules.add_column(column, justify="right" if column in ("#", "layers", "parameters") else "left")
    for rule in report["rules"]:
        options = ", ".join(f"{k}={v}" for k, v in rule["options"].items())
        rules.add_row(
            str(rule["rule"]),
            rule["kind"],
            "\n".join(rule["targets"]),
            str(len(rule["layers"])),
            options,
            f"{rule['parameters']:,}",
        )
    console.print(rules)
    for name, count in report["extra_weights"].items():
        console.print(f"extra weights: {name} ({count:,} parameters)")
    console.print(f"trainable parameters in all: {report['trainable_parameters']:,}")
    experts = [(rule["rule"], e) for rule in report["rules"] for e in rule["experts"]]
    if experts:
        table = Table(title="experts referenced", title_justify="left")
        for column in ("rule", "#", "folder", "recorded sha256", "now"):
            table.add_column(column)
        for rule, e in experts:
            table.add_row(
                str(rule), str(e["index"]), e["path"], (e["recorded_sha256"] or "-")[:16], e["status"]
            )
        console.print(table)
    if "base_check" in report:
        console.print(report["base_check"])
    if "routing" in report:
        _print_routing(report["routing"], console)


def _print_routing(routing: dict[str, Any], console: Console) -> None:
    table = Table(title=f"routing on {routing['batches']} validation batches", title_justify="left")
    layers = routing["layers"]
    experts = max(len(layer["load"]) for layer in layers.values())
    for column in ["layer", *(f"expert {e}" for e in range(experts)), "entropy", "dead"]:
        table.add_column(column, justify="left" if column == "layer" else "right")
    for name, layer in zip(short_names(list(layers)), layers.values(), strict=True):
        loads = [f"{100 * share:.0f}%" for share in layer["load"]] + [""] * (experts - len(layer["load"]))
        table.add_row(name, *loads, f"{layer['entropy']:.2f}", str(layer["dead_experts"]))
    console.print(table)
    console.print(summary_line(routing["summary"]))


def main(args: list[str] | None = None) -> dict[str, Any]:
    """describe a saved adapter folder: rules, layers, parameters, fingerprint, experts (--data: routing; `inspect intruders`: intruder dimensions)"""
    if args and args[0] == "intruders":
        from lightning_moe.intruders import main as intruders

        return intruders(args[1:])
    parser = ArgumentParser(prog="python -m lightning_moe inspect", description=__doc__)
    parser.add_argument(
        "adapter_dir", type=str, help="A saved adapter folder (adapter_config.json + weights)."
    )
    parser.add_argument(
        "--base",
        nargs="+",
        default=None,
        help="Fit config file(s) whose model is the base (default: the run's config.yaml beside the folder).",
    )
    parser.add_argument(
        "--data",
        action=ActionYesNo,
        default=False,
        help="Also route validation batches of that config's data.",
    )
    parser.add_argument("--batches", type=int, default=4, help="How many validation batches --data routes.")
    parser.add_argument("--json", action=ActionYesNo, default=False, help="Print JSON instead of tables.")
    settings = parser.parse_args(args)
    folder = Path(settings.adapter_dir)
    report = describe_folder(folder)
    configs = settings.base
    if configs is None and settings.data:
        beside = folder.parent / "config.yaml"
        if not beside.is_file():
            raise UserInputError(f"--data needs --base CONFIG: there is no run config at {beside}")
        configs = [str(beside)]
    if configs:
        task, datamodule = adapted_task(folder, configs)
        report["base_check"] = (
            f"base: the model of {configs[-1]} matches the fingerprint of {report['fingerprint']['layers']} layers"
        )
        if settings.data:
            report["routing"] = routing_report(
                routing_on_data(task, datamodule, settings.batches), settings.batches
            )
    if settings.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report, Console(width=max(Console().width, 120)))
    return report

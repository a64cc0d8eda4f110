"""`python -m lightning_moe export-quantized ADAPTER --output DIR`: an L4Q adapter merged into
its base and written as b-bit integer codes with their step sizes; `--compare` also validates the
model three ways on the fit config's data: as trained (Q(W + s B A), unmerged), unquantised
(W + s B A) and from the written codes (the merged quantised model), printed as a table and
written to compare.json in the export."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from jsonargparse import ActionYesNo, ArgumentParser
from lightning import Trainer
from torch import Tensor, nn

from lightning_moe.adapted_task import adapted_task
from lightning_moe.adapters import L4QAdapter, adapted_layers, adapters_disabled, set_fake_quantization
from lightning_moe.adapters.files import read_safetensors, write_folder_files
from lightning_moe.errors import UserInputError

CODES_FILE = "quantized_layers.safetensors"
CONFIG_FILE = "quantized_config.json"


def quantized_layers(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """{layer: {codes, step_size}} of every l4q layer: codes * step_size is its merged weight."""
    layers = {}
    for name, layer in adapted_layers(model):
        if isinstance(layer.adapter, L4QAdapter):
            codes, steps = layer.adapter.integer_codes(layer.base_layer.weight)
            layers[name] = {"codes": codes, "step_size": steps}
    if not layers:
        raise UserInputError(
            "the adapter has no l4q layers: export-quantized writes quantisation-aware adapters"
        )
    return layers


def write_export(model: nn.Module, folder: str, overwrite: bool = False) -> Path:
    layers = quantized_layers(model)
    tensors = {f"{name}.{key}": value for name, parts in layers.items() for key, value in parts.items()}
    config = {
        name: {"bits": layer.adapter.config.bits, "group_size": layer.adapter.group_size}
        for name, layer in adapted_layers(model)
        if name in layers
    }
    return write_folder_files(
        folder, {CODES_FILE: tensors}, {CONFIG_FILE: json.dumps(config, indent=2)}, overwrite
    )


@torch.no_grad()
def load_export(model: nn.Module, folder: str | Path) -> int:
    """Give `model`'s layers the weights codes * step_size of an export (each layer's base weight
    where it is adapted); returns how many layers it set."""
    config = json.loads((Path(folder) / CONFIG_FILE).read_text())
    tensors = read_safetensors(Path(folder) / CODES_FILE)
    for name, settings in config.items():
        module = model.get_submodule(name)
        linear = getattr(module, "base_layer", module)
        steps = tensors[f"{name}.step_size"].repeat_interleave(settings["group_size"], dim=1)
        linear.weight.copy_(tensors[f"{name}.codes"].to(steps.dtype) * steps)
    return len(config)


def compare(task, datamodule, folder: Path) -> dict[str, dict[str, float]]:
    """Validation metrics as trained, unquantised, and from the written codes."""
    trainer = Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    results = {"L4Q as trained (unmerged)": trainer.validate(task, datamodule, verbose=False)[0]}
    set_fake_quantization(task.model, False)
    results["W + s B A, unquantised"] = trainer.validate(task, datamodule, verbose=False)[0]
    with adapters_disabled(task.model):
        load_export(task.model, folder)
        results["merged and quantised (from the export)"] = trainer.validate(task, datamodule, verbose=False)[
            0
        ]
    return results


def main(args: list[str] | None = None) -> dict:
    """merge an L4Q adapter into its base and write the quantised layers as integer codes (--compare: validate as trained, unquantised and merged)"""
    parser = ArgumentParser(prog="python -m lightning_moe export-quantized", description=__doc__)
    parser.add_argument("adapter_dir", type=str, help="A saved adapter folder with l4q layers.")
    parser.add_argument("--output", type=str, required=True, help="The new folder (must not hold an export).")
    parser.add_argument(
        "--base",
        nargs="+",
        default=None,
        help="Fit config file(s) of the base (default: the run's config.yaml).",
    )
    parser.add_argument(
        "--compare", action=ActionYesNo, default=False, help="Validate the three ways on the config's data."
    )
    parser.add_argument("--overwrite", action=ActionYesNo, default=False, help="Replace an existing export.")
    settings = parser.parse_args(args)
    folder = Path(settings.adapter_dir)
    configs = settings.base or [str(folder.parent / "config.yaml")]
    if not Path(configs[-1]).is_file():
        raise UserInputError(f"export-quantized needs --base CONFIG: there is no run config at {configs[-1]}")
    task, datamodule = adapted_task(folder, configs)
    written = write_export(task.model, settings.output, settings.overwrite)
    print(f"wrote the merged quantised layers of {folder} to {written}")
    report = {"output": str(written)}
    if settings.compare:
        report["metrics"] = compare(task, datamodule, written)
        (written / "compare.json").write_text(json.dumps(report["metrics"], indent=2))
        names = sorted({key for metrics in report["metrics"].values() for key in metrics})
        print("| model | " + " | ".join(names) + " |")
        print("|---|" + "---:|" * len(names))
        for label, metrics in report["metrics"].items():
            print(f"| {label} | " + " | ".join(f"{metrics.get(n, float('nan')):.4f}" for n in names) + " |")
    return report

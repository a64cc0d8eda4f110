"""Callbacks of the application shell."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from lightning_moe.module import AdapterModule


class ExportAdapter(L.Callback):
    """At the end of `fit`, write the adapters as a stand-alone folder (adapter_config.json +
    adapter_model.safetensors) that `adapter_path` or `load_adapter` reads back.

    Args:
        dirpath: Target folder; default: "adapter" inside the run's log directory.
        base_model: Name recorded in the adapter config (informational).
    """

    def __init__(self, dirpath: str | None = None, base_model: str = "") -> None:
        self.dirpath = dirpath
        self.base_model = base_model

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, AdapterModule) or not trainer.is_global_zero:
            return
        folder = Path(self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "adapter")
        pl_module.export_adapter(str(folder), base_model=self.base_model)
        rank_zero_info(f"adapter written to {folder}")

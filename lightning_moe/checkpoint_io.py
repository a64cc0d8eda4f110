"""Checkpoints written so that a crash mid-write never damages the previous one.

Lightning's `TorchCheckpointIO` writes a local checkpoint through a temporary file in the
system's temp folder and then moves it into place; when that folder is another filesystem (a
tmpfs /tmp), the move is a copy into the final file, and a crash during it leaves a truncated
checkpoint where the last good one was. `AtomicCheckpointIO` writes beside the target and
renames it into place, which is atomic on one filesystem.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.strategies import Strategy


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` into `.<name>.partial` beside the target, fsync, then `os.replace`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's own way
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        with partial.open("wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)


def use_atomic_checkpoints(strategy: Strategy) -> None:
    """Give the strategy `AtomicCheckpointIO` unless it was configured with another CheckpointIO."""
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()

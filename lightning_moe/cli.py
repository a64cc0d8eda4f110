"""`python -m lightning_moe fit|validate|test|predict --config ...`: LightningCLI over any
`AdapterModule` task and any LightningDataModule, chosen by `class_path` in the YAML."""

from __future__ import annotations

import sys

import lightning as L
from lightning.pytorch.cli import LightningCLI

from lightning_moe.adapters.errors import UserInputError
from lightning_moe.module import AdapterModule


def _chain_text(error: BaseException) -> str:
    parts = []
    while error is not None:
        parts.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(parts)


def main(args: list[str] | None = None) -> LightningCLI:
    UserInputError.latest = None
    try:
        return LightningCLI(
            AdapterModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            # each task builds its parameter groups (adapters / routers / extra) in configure_optimizers
            auto_configure_optimizers=False,
            args=args,
        )
    except Exception as error:
        # Bad input gets its one clear message, also when jsonargparse wrapped it in a long error.
        cause = UserInputError.latest
        if cause is None or str(cause) not in _chain_text(error):
            raise
        sys.exit(f"error: {cause}")

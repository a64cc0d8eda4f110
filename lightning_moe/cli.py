"""`python -m lightning_moe fit|validate|test|predict --config ...`: LightningCLI over any
`AdapterModule` task and any LightningDataModule, chosen by `class_path` in the YAML.
`python -m lightning_moe suite --config ...` runs the continual-learning benchmark suite
(`lightning_moe.suite`)."""

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


def main(args: list[str] | None = None, run: bool = True, overwrite_config: bool = False):
    """The CLI; `run=False` parses and instantiates the model and data without running;
    `overwrite_config` lets a resumed run write its config.yaml where the first attempt did."""
    args = sys.argv[1:] if args is None else list(args)
    UserInputError.latest = None
    try:
        if args[:1] == ["suite"]:
            from lightning_moe.suite import main as suite_main  # the suite calls back into this CLI

            return suite_main(args[1:])
        return LightningCLI(
            AdapterModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            # each task builds its parameter groups (adapters / routers / extra) in configure_optimizers
            auto_configure_optimizers=False,
            args=args,  # with run=False: no subcommand, the arguments of `fit` alone
            run=run,
            save_config_kwargs={"overwrite": overwrite_config},
        )
    except Exception as error:
        # Bad input gets its one clear message, also when jsonargparse wrapped it in a long error.
        cause = UserInputError.latest
        if cause is None or str(cause) not in _chain_text(error):
            raise
        sys.exit(f"error: {cause}")

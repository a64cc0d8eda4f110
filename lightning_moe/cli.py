"""`python -m lightning_moe fit|validate|test|predict --config ...`: LightningCLI over any
`TaskModule` task and any LightningDataModule, chosen by `class_path` in the YAML. Other commands
(`suite`, ...) are registered by the packages that own them (see `lightning_moe.commands`).

Values a model needs from its data are linked at parse time: where the task and the data module
both have a parameter of a name in `DATA_LINKS`, the data module's value is the task's; a task
with a `data` parameter receives the data module itself.

Every failure a user can cause ends in one line starting with `error:` and a non-zero exit
code: 2 when the command line or a config file does not parse (an unknown key, a value of the
wrong type, a missing file), 1 for everything found later (a value a class refuses, a checkpoint
that is not one, a target that matches nothing, a non-finite loss).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import lightning as L
from jsonargparse import ArgumentError
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lightning_moe.adapters.errors import AdapterOptionError
from lightning_moe.checkpoint_io import use_atomic_checkpoints
from lightning_moe.commands import command, command_summaries
from lightning_moe.config_errors import UNION_TEXT, one_line
from lightning_moe.errors import STOPPING_ERRORS, ConfigError, UserInputError
from lightning_moe.progress import default_progress_bar
from lightning_moe.run_folder import (
    check_checkpoint_path,
    check_earlier_run,
    failed_start_cleanup,
    run_folder,
)
from lightning_moe.task import TaskModule
from lightning_moe.tensorboard_views import TensorBoardViews

PROG = "python -m lightning_moe"
SUBCOMMANDS = {
    "fit": "train a task from its config, validating as its trainer settings say",
    "validate": "score a task on its validation data (from a config, optionally --ckpt_path)",
    "test": "score a task on its test data",
    "predict": "write a task's predictions (e.g. generations with their scores) for its predict data",
}
DATA_LINKS = ("tokenizer", "image_token", "audio_token", "image_size", "domains", "sources", "styles")
USAGE_ERROR = 2  # a config or argument that does not parse; every other error exits with 1


class KeepFirstConfig(SaveConfigCallback):
    """Lightning's config.yaml writer, except that a resumed run keeps the config its first
    attempt wrote (the CLI refuses every other run into a folder that holds one)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.already_saved and self.save_to_log_dir:
            path = os.path.join(trainer.log_dir, self.config_filename)
            exists = os.path.isfile(path) if trainer.is_global_zero else False
            self.already_saved = trainer.strategy.broadcast(exists)
        super().setup(trainer, pl_module, stage)


class LightningMoeCLI(LightningCLI):
    """LightningCLI with the checks that make a run fail safe: the checkpoint path is checked
    right after parsing (before Lightning reads it), a run folder that holds an earlier run is
    refused, checkpoints are written atomically, and a run that fails before its first training
    step leaves nothing behind (see `run_folder`)."""

    def add_arguments_to_parser(self, parser) -> None:
        # a link applies where both sides have the parameter; elsewhere it is left out
        for name in DATA_LINKS:
            parser.link_arguments(f"data.init_args.{name}", f"model.init_args.{name}")
        parser.link_arguments("data", "model.init_args.data", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        # every run gets the TensorBoard views and, unless it names one or turns it off, a
        # progress display that works in a terminal and in a log file
        trainer = self._get(self.config_init, "trainer", default={})
        callbacks = list(trainer.get("callbacks") or [])
        extra = [TensorBoardViews()]
        wants_bar = trainer.get("enable_progress_bar") is not False
        if wants_bar and not any(isinstance(c, ProgressBar) for c in callbacks):
            extra.append(default_progress_bar())
        trainer["callbacks"] = callbacks + extra
        return super().instantiate_trainer(**kwargs)

    def parse_arguments(self, parser, args) -> None:
        # LightningCLI's own version warns whenever `args` is given and sys.argv is not empty,
        # which is every run the suite starts; the parsing itself is the same
        try:
            self.config = parser.parse_args(args)
        except ArgumentError as error:
            raise ConfigError(one_line(error, _option_names(parser, args))) from None
        subcommand = self.config.get("subcommand")
        if subcommand:
            check_checkpoint_path(self.config[subcommand].get("ckpt_path"))

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as error:
            # a value refused while jsonargparse instantiated the config (e.g. by a config
            # dataclass) arrives wrapped in its union-matching text
            if UNION_TEXT not in str(error):
                raise
            # an adapter mapping's unknown kind or option is the config's fault, as a bad key is
            cause = _chained(error, AdapterOptionError)
            raise (ConfigError if cause else UserInputError)(one_line(cause or error)) from None

    def fit(self, **kwargs: Any) -> None:
        self._run_safely("fit", kwargs)

    def validate(self, **kwargs: Any) -> None:
        self._run_safely("validate", kwargs)

    def test(self, **kwargs: Any) -> None:
        self._run_safely("test", kwargs)

    def predict(self, **kwargs: Any) -> None:
        self._run_safely("predict", kwargs)

    def _run_safely(self, subcommand: str, kwargs: dict[str, Any]) -> None:
        # Only the first process checks and cleans: the others (started by it) would race its writes.
        folder = run_folder(self.trainer) if rank_zero_only.rank == 0 else None
        check_earlier_run(folder, kwargs.get("ckpt_path"))
        use_atomic_checkpoints(self.trainer.strategy)
        with failed_start_cleanup(self.trainer, folder):
            getattr(self.trainer, subcommand)(**kwargs)


def _chained(error: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first exception of type `kind` in the chain of causes of `error`."""
    while error is not None and not isinstance(error, kind):
        error = error.__cause__ or error.__context__
    return error


def _parser_settings() -> dict[str, Any]:
    # parse errors are raised (not printed with the usage) so `main` can print one line
    settings = {"exit_on_error": False, "prog": PROG}
    return settings | {name: {"exit_on_error": False} for name in SUBCOMMANDS}


def _option_names(parser, args: list[str] | None) -> list[str]:
    """The dotted option names of the subcommand being parsed (for "did you mean")."""
    words = sys.argv[1:] if args is None else list(args)
    subparsers = getattr(getattr(parser, "_subcommands_action", None), "choices", {})
    chosen = next((subparsers[word] for word in words if word in subparsers), parser)
    return sorted({action.dest for action in chosen._actions if action.dest not in ("help", "config")})


def overview() -> str:
    """`python -m lightning_moe --help`: every command, Lightning's and the registered ones."""
    described = SUBCOMMANDS | command_summaries()
    width = max(map(len, described))
    lines = [
        f"usage: {PROG} <command> [options]",
        f"       {PROG} <command> --help    (the options of one command)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {summary}" for name, summary in described.items()]
    lines += ["", f"example: {PROG} fit --config configs/reasoning/mole_smollm2.yaml"]
    return "\n".join(lines)


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI | Any:
    """The CLI (`args`: the command line without the program; None reads sys.argv). `run=False`
    parses and instantiates the model and data of a `fit` config without running it."""
    words = sys.argv[1:] if args is None else list(args)
    if not words or words[0] in ("-h", "--help"):
        print(overview())
        return None
    try:
        run_command = command(words[0]) if words[0] not in SUBCOMMANDS else None
        if run_command is not None:
            return run_command(words[1:])
        return LightningMoeCLI(
            TaskModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            # each task builds its parameter groups (adapters / routers / extra) in configure_optimizers
            auto_configure_optimizers=False,
            save_config_callback=KeepFirstConfig,
            parser_kwargs=_parser_settings(),
            args=args,  # None: LightningCLI reads sys.argv itself (no warning about both)
            run=run,
        )
    except ConfigError as error:
        sys.stderr.write(f"error: {error}\n")
        sys.exit(USAGE_ERROR)
    except STOPPING_ERRORS as error:
        sys.exit(f"error: {error}")  # printed by Python, exit code 1

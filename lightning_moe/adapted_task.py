"""A fit config's task, built with a saved adapter folder: what `inspect --data` and
`inspect intruders` look at."""

from __future__ import annotations

from pathlib import Path

import yaml

from lightning_moe.errors import UserInputError


def adapted_task(folder: Path, configs: list[str]):
    """The task and data module of a fit config, the task built with the adapter in `folder`
    (building checks the base fingerprint: a different base is an error)."""
    from lightning_moe.cli import main as cli_main  # the CLI imports the command registry, not this

    arguments = []
    for config in configs:
        settings = yaml.safe_load(Path(config).read_text()) if Path(config).is_file() else None
        if not isinstance(settings, dict):
            raise UserInputError(f"--base {config}: expected a fit config file (YAML mapping)")
        # a run's saved config.yaml also holds fit's own arguments (ckpt_path, ...): not needed to build
        built = {
            key: settings[key] for key in ("seed_everything", "trainer", "model", "data") if key in settings
        }
        arguments += ["--config", yaml.safe_dump(built)]
    arguments += [f"--model.init_args.adapter_path={folder}", "--trainer.logger=false"]
    cli = cli_main(arguments, run=False)
    task = cli.model
    if not hasattr(task, "adapter_path"):
        raise UserInputError(f"the model of {configs[-1]} ({type(task).__name__}) takes no adapters")
    task.configure_model()
    return task, cli.datamodule

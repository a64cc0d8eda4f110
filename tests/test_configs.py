"""Every YAML under configs/ runs through the CLI exactly as its first line says, on tiny models
(the overlays in tests/configs). The trainer files in configs/_base/ compose with task configs in
several processes: test_parallel runs them."""

import shlex
from pathlib import Path

import pytest
import yaml

from lightning_moe.cli import main
from tests.tiny import REPO, launch_configs, tiny_run_arguments

CONFIGS = sorted(path for path in (REPO / "configs").rglob("*.yaml") if path.parent.name != "_base")
# LightningCLI configs; the suite's own configs run in tests/tasks/continual/test_suite.py
FIT_CONFIGS = [path for path in CONFIGS if not path.read_text().startswith("# python -m lightning_moe suite")]


def launch_args(config: Path) -> list[str]:
    """The arguments of the `python -m lightning_moe ...` command on the config's first line."""
    first_line = config.read_text().splitlines()[0]
    prefix = "# python -m lightning_moe "
    assert first_line.startswith(prefix), f"{config} must start with its launch command"
    args = shlex.split(first_line.removeprefix(prefix))
    return [str(REPO / a) if a.endswith(".yaml") else a for a in args]


def test_there_are_configs():
    assert CONFIGS


@pytest.mark.parametrize("config", FIT_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_config_prints_a_config_that_parses_again(config, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = launch_args(config)
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path" in yaml.safe_load(printed)["model"]
    (tmp_path / "printed.yaml").write_text(printed)
    with pytest.raises(SystemExit):
        main([args[0], "--config", str(tmp_path / "printed.yaml"), "--print_config"])
    assert capsys.readouterr().out == printed


@pytest.mark.parametrize("config", FIT_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_config_runs_fast_dev_run(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny = tiny_run_arguments(config, launch_configs(config))
    cli = main([*launch_args(config), *tiny, "--trainer.fast_dev_run=2"])
    assert cli.trainer.state.finished
    if cli.subcommand == "fit":
        assert cli.trainer.global_step == 2
    else:
        assert cli.subcommand == "predict" and cli.trainer.predict_loop.predictions

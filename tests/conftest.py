"""Fixtures shared by the tests: offline, CPU, a temporary working directory per run."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests.tiny import TINY_LLAMA, tiny_run_arguments, write_tiny_experts  # noqa: E402


@pytest.fixture
def tiny_llama_config() -> dict:
    return dict(TINY_LLAMA)


@pytest.fixture
def tiny_experts():
    """write(folders): tiny random LoRA experts that fit the tiny reasoning Llama."""
    return write_tiny_experts


@pytest.fixture
def run_config(tmp_path, monkeypatch):
    """run_config(config, subcommand, *args): the CLI on a shipped config with its tiny overlays
    (tests/configs), in a temporary working directory."""
    from lightning_moe.cli import main

    monkeypatch.chdir(tmp_path)

    def run(config: Path, subcommand: str, *args: str):
        return main([subcommand, "--config", str(config), *tiny_run_arguments(config), *args])

    return run

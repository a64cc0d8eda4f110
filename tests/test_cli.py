"""The CLI's own behaviour: one clear error line for bad input (see also test_reliability.py)."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from lightning_moe.cli import main
from tests.tiny import REPO

LIGHTNING_MOE_SCRIPT = str(Path(sys.executable).parent / "lightning-moe")


def smoke_fit_error(adapters: str, capsys) -> tuple[int, str]:
    """What the CLI says (exit code, stderr's error line) when the smoke config runs with these
    adapter rules (YAML)."""
    config = REPO / "configs/smoke/mole_tiny_llama.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), f"--model.init_args.adapters={adapters}"])
    code = exit_info.value.code
    if isinstance(code, str):
        return 1, code
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    return code, line


def test_bad_adapter_option_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, message = smoke_fit_error(
        "[{targets: [mlp.up_proj], adapter: {kind: moe, num_experts: 2, top_k: 3}}]", capsys
    )
    assert (code, message) == (
        1,
        "error: adapter rule for ['mlp.up_proj']: top_k must be between 1 and num_experts=2, got top_k=3",
    )


def test_unmatched_target_fails_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, message = smoke_fit_error("[{targets: [mlp.nothing_here], adapter: {kind: lora}}]", capsys)
    assert code == 1 and message.startswith("error: target pattern 'mlp.nothing_here' matched no module")
    assert not list(tmp_path.rglob("*"))


def registered_names() -> list[str]:
    from importlib.metadata import entry_points

    return [entry.name for entry in entry_points(group="lightning_moe.commands")]


@pytest.mark.parametrize(
    "launcher", [[sys.executable, "-m", "lightning_moe"], [LIGHTNING_MOE_SCRIPT]], ids=["module", "script"]
)
def test_help_lists_every_command_with_a_description(launcher):
    done = subprocess.run([*launcher, "--help"], capture_output=True, text=True, check=True, timeout=120)
    lines = done.stdout.splitlines()
    assert lines[0] == "usage: python -m lightning_moe <command> [options]"
    listed = {line.split()[0]: line.split(None, 1)[1] for line in lines if line.startswith("  ")}
    assert set(listed) >= {"fit", "validate", "test", "predict", "suite", "inspect"}
    assert set(listed) >= set(registered_names())
    assert all(len(description) > 20 for description in listed.values())


def test_a_command_help_shows_the_module_as_program():
    done = subprocess.run(
        [sys.executable, "-m", "lightning_moe", "fit", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.startswith("usage: python -m lightning_moe [options] fit")


def test_a_run_whose_output_is_not_a_terminal_prints_progress_lines(tmp_path):
    # stderr is a pipe here, as under CI or `| tee`: Rich would draw nothing until the end
    config = REPO / "configs/smoke/mole_tiny_llama.yaml"
    done = subprocess.run(
        [sys.executable, "-m", "lightning_moe", "fit", "--config", str(config), "--trainer.max_steps=6",
         "--trainer.val_check_interval=6", "--data.init_args.train_size=48"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300, env=os.environ | {"HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stderr.splitlines()
    assert "training: 6 batches" in lines
    assert any(line.startswith("training: 6/6 batches") and "train/loss" in line for line in lines)
    assert any(line.startswith("validation: ") and line.endswith(" s") for line in lines)
    assert "Epoch 0/-2" not in done.stderr and "Epoch 0/-2" not in done.stdout


def test_the_terminal_bar_names_the_step_limit():
    from lightning_moe.progress import StepProgressBar

    bar = StepProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1, max_steps=40)
    assert bar._get_train_description(0) == "Training, step limit 40"
    bar._trainer = SimpleNamespace(max_epochs=3, max_steps=-1)
    assert bar._get_train_description(1).strip() == "Epoch 1/2"


@pytest.mark.parametrize(
    ("adapters", "code", "message"),
    [
        (
            "[{targets: [mlp.up_proj], adapter: {kind: codyra, init: lora_ga}}]",
            1,  # a value the kind refuses (exit 2 is for what does not parse)
            "error: adapter rule for ['mlp.up_proj']: init='lora_ga' does not apply to rank-gated LoRA adapters",
        ),
        (
            "[{targets: [mlp.up_proj], adapter: {kind: moe, num_experts: 4, rank: 20, init: eva}}]",
            1,
            "error: init 'eva': layer 'model.layers.0.mlp.up_proj' would take 80 directions of its 64-dim inputs; "
            "the rank budget cannot be met",
        ),
        (
            "[{targets: [self_attn.k_proj], adapter: {kind: lora, rank: 24, init: lora_ga}}]",
            1,
            "error: init 'lora_ga' takes 2 * rank = 48 singular vectors of a [32, 64] gradient; "
            "the rank budget cannot be met, use rank <= 16",
        ),
    ],
    ids=["init the kind cannot use", "eva beyond the input width", "lora_ga beyond the rank"],
)
def test_data_driven_init_errors_are_one_line_before_training(
    tmp_path, monkeypatch, capsys, adapters, code, message
):
    monkeypatch.chdir(tmp_path)
    exit_code, line = smoke_fit_error(adapters, capsys)
    assert exit_code == code and line.startswith(message)
    assert not Path("runs").exists() or not any(Path("runs").rglob("*.ckpt"))  # nothing trained


def test_progress_lines_count_every_epoch_of_an_epoch_bounded_run():
    from lightning_moe.progress import _training_steps

    trainer = SimpleNamespace(max_epochs=6, max_steps=-1, accumulate_grad_batches=1)
    assert _training_steps(trainer, 63) == 378
    trainer = SimpleNamespace(max_epochs=6, max_steps=100, accumulate_grad_batches=2)
    assert _training_steps(trainer, 63) == 100  # 6 x 32 steps, but max_steps comes first
    trainer = SimpleNamespace(max_epochs=-1, max_steps=40, accumulate_grad_batches=1)
    assert _training_steps(trainer, float("inf")) == 40
    trainer = SimpleNamespace(max_epochs=-1, max_steps=-1, accumulate_grad_batches=1)
    assert _training_steps(trainer, float("inf")) == 0

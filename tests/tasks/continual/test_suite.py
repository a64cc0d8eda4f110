"""The continual-learning suite command as a user runs it: every method of the embedded suite
config on a tiny stream, tables and TensorBoard files, a real kill (SIGKILL) and resume that
reproduces the uninterrupted matrix, and bad suite input before anything trains."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lightning_moe.cli import main
from tests.tiny import REPO, overlay, write_tiny_minilm

SUITE = REPO / "configs" / "continual" / "suite.yaml"
TINY_STREAM = [
    overlay("continual_stream"),
    "--data.init_args.epochs_per_task=2",
    "--trainer.max_epochs=4",
]


def suite_args(output: Path, methods: dict[str, str] | None = None, overrides: list[str] = ()) -> list[str]:
    args = [
        "suite",
        "--config",
        str(SUITE),
        f"--stream={REPO / 'configs/continual/embedded_stream.yaml'}",
        f"--output_dir={output}",
        f"--overrides={json.dumps([*TINY_STREAM, *overrides])}",
    ]
    if methods is not None:
        args.append(f"--methods={json.dumps(methods)}")
    return args


def method_configs(*names: str) -> dict[str, str]:
    return {name: str(REPO / "configs" / "continual" / f"{name}.yaml") for name in names}


def test_the_embedded_suite_runs_every_method_and_seed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_tiny_minilm()
    methods = method_configs("lora", "mora", "codyra", "moe_adapters")
    table = main([*suite_args(tmp_path / "suite", methods), "--seeds=[0, 1]"])
    # one progress line per task of each run, and one when the run ends
    progress = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[run ")]
    assert progress[0].startswith("[run 1/8] lora seed 0: task 1/2 (")
    assert progress[1].startswith("[run 1/8] lora seed 0: task 2/2 (") and "% on it" in progress[1]
    assert progress[2].startswith("[run 1/8] lora seed 0: done; after ")
    assert progress[-1].startswith("[run 8/8] moe_adapters seed 1: done")
    assert len(progress) == 8 * 3
    lines = table.splitlines()
    assert lines[0].startswith("| method | n | transfer | avg | last | mtil_mean | bwt | fwt | forgetting |")
    assert [line.split(" | ")[0].strip("| ") for line in lines[2:]] == ["zero-shot", *methods]
    assert all(line.split(" | ")[1] == "2" for line in lines[2:])
    assert (tmp_path / "suite" / "results.csv").read_text().count("\n") == 6
    for method in methods:
        for seed in (0, 1):
            run = tmp_path / "suite" / method / f"seed{seed}"
            assert np.load(run / "accuracy_matrix.npy").shape == (2, 2)
            assert (run / "tasks" / "task1" / "adapter_model.safetensors").is_file()
            assert list(run.glob("events.out.tfevents*"))
    seeds = [
        json.loads((tmp_path / "suite" / "lora" / f"seed{s}" / "accuracy_matrix.json").read_text())
        for s in (0, 1)
    ]
    assert seeds[0]["matrix"] != seeds[1]["matrix"] or seeds[0]["zero_shot"] != seeds[1]["zero_shot"]


KILLER = '''
import os, signal
import lightning as L

class KillAtSecondTask(L.Callback):
    """SIGKILL at the start of the second task: the first task's checkpoint is on disk."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 2:
            os.kill(os.getpid(), signal.SIGKILL)
'''


def test_a_killed_suite_resumes_and_reproduces_the_matrix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_tiny_minilm()
    methods = method_configs("mora")
    main([*suite_args(tmp_path / "reference", methods), "--seeds=[0]"])
    (tmp_path / "killer.py").write_text(KILLER)
    killed = subprocess.run(
        [sys.executable, "-m", "lightning_moe"]
        + suite_args(tmp_path / "killed", methods, ["--trainer.callbacks+=killer.KillAtSecondTask"])
        + ["--seeds=[0]"],
        env=os.environ | {"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"},
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run = tmp_path / "killed" / "mora" / "seed0"
    partial = json.loads((run / "accuracy_matrix.json").read_text())
    assert len(partial["matrix"]) == 1 and (run / "checkpoints" / "last.ckpt").is_file()
    main([*suite_args(tmp_path / "killed", methods), "--seeds=[0]"])  # the same command again
    reference = json.loads((tmp_path / "reference" / "mora" / "seed0" / "accuracy_matrix.json").read_text())
    resumed = json.loads((run / "accuracy_matrix.json").read_text())
    assert resumed["matrix"] == reference["matrix"] and resumed["kept"] == reference["kept"]
    assert (tmp_path / "killed" / "results.md").read_text() == (
        tmp_path / "reference" / "results.md"
    ).read_text()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--seeds=[0, 0]", "seeds must be distinct"),
        ('--methods={"lora": "configs/continual/nope.yaml"}', "suite config files not found"),
        (f'--methods={{"zero-shot": "{SUITE}"}}', "not 'zero-shot'"),
    ],
)
def test_bad_suite_input_is_one_clear_error(tmp_path, monkeypatch, override, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([*suite_args(tmp_path / "suite", method_configs("lora")), override])
    assert message in str(exit_info.value.code)
    assert not (tmp_path / "suite").exists()


def test_a_bad_stream_stops_the_suite_before_anything_trains(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_tiny_minilm()
    args = suite_args(
        tmp_path / "suite", method_configs("lora"), ["--data.init_args.tasks=[digits, /no/such/root]"]
    )
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert "unknown dataset '/no/such/root'" in str(exit_info.value.code)
    assert not (tmp_path / "suite").exists()

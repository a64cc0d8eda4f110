"""Fail-safe behaviour of whole runs, as docs/reliability.md lists it: each bad input ends in one
`error:` line and a non-zero exit before anything is written, non-finite training stops at
its step, killed writes keep the previous files, and two processes can build one cache."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lightning_moe.adapters import load_adapter
from lightning_moe.adapters.files import read_safetensors
from lightning_moe.cli import main
from tests.tiny import REPO, tiny_causal_lm_task

SMOKE = str(REPO / "configs/smoke/mole_tiny_llama.yaml")
SMALL = [
    "--data.init_args.train_size=32",
    "--data.init_args.batch_size=8",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def fit(*extra: str):
    return main(["fit", "--config", SMOKE, *SMALL, *extra])


def cli_error(capsys, *args: str) -> tuple[int, list[str]]:
    """Run the CLI expecting it to stop: (exit code, the lines it wrote to stderr that start
    with `error:`)."""
    with pytest.raises(SystemExit) as stopped:
        main(list(args))
    code = stopped.value.code
    if isinstance(code, str):  # sys.exit("error: ...") prints the message itself
        return 1, [code]
    return code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def checkpoint_every(steps: int) -> str:
    """A config overlay: the smoke config's callbacks with a checkpoint every `steps` steps."""
    overlay = Path(f"checkpoint_every_{steps}.yaml")
    overlay.write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        f"      init_args: {{save_last: true, every_n_train_steps: {steps}}}\n"
        "    - class_path: lightning_moe.callbacks.ExportAdapter\n"
    )
    return f"--config={overlay.resolve()}"


def files_under(folder: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --- config errors: one line, nothing written; exit code 2 when the config does not parse -----------------
CONFIG_ERRORS = {
    "adapter option typo": (
        ["--model.init_args.adapters=[{targets: [mlp.up_proj], adapter: {kind: lora, rnak: 4}}]"],
        "error: adapter rule for ['mlp.up_proj']: a 'lora' adapter has no option 'rnak'; did you mean 'rank'?",
    ),
    "unknown adapter kind": (
        ["--model.init_args.adapters=[{targets: [mlp.up_proj], adapter: {kind: lorra}}]"],
        "error: adapter rule for ['mlp.up_proj']: unknown adapter kind 'lorra'; expected one of",
    ),
    "unknown command-line option": (
        ["--trainr.max_steps=3"],
        "error: unknown option --trainr.max_steps; did you mean 'trainer.max_steps'?",
    ),
    "option of the wrong type": (
        ["--trainer.max_steps=abc"],
        "error: trainer.max_steps: Expected a <class 'int'>",
    ),
    "model option typo": (
        ["--model.init_args.router_loss.balance_coeff=3"],
        "error: model.init_args.router_loss: unknown option 'balance_coeff' of RouterLoss; did you mean 'balance_coef'?",
    ),
}


@pytest.mark.parametrize("case", CONFIG_ERRORS, ids=list(CONFIG_ERRORS))
def test_a_config_error_is_one_line_with_exit_code_2(workdir, capsys, case):
    args, message = CONFIG_ERRORS[case]
    code, lines = cli_error(capsys, "fit", "--config", SMOKE, *args)
    assert code == 2 and len(lines) == 1 and lines[0].startswith(message), lines
    assert not list(workdir.iterdir())


def test_a_value_a_class_refuses_is_one_line_with_exit_code_1(workdir, capsys):
    adapters = "[{targets: [mlp.up_proj], adapter: {kind: moe, num_experts: 2, top_k: 3}}]"
    code, lines = cli_error(capsys, "fit", "--config", SMOKE, f"--model.init_args.adapters={adapters}")
    message = (
        "error: adapter rule for ['mlp.up_proj']: top_k must be between 1 and num_experts=2, got top_k=3"
    )
    assert (code, lines) == (1, [message])
    assert not list(workdir.iterdir())


def test_a_typo_at_the_top_of_a_config_file_and_a_missing_config_file(workdir, capsys):
    Path("typo.yaml").write_text("trainr:\n  max_steps: 3\n")
    code, lines = cli_error(capsys, "fit", "--config", SMOKE, "--config", "typo.yaml")
    assert (code, lines) == (
        2,
        ["error: unknown key 'trainr' (in 'trainr.max_steps'); did you mean 'trainer'?"],
    )
    code, lines = cli_error(capsys, "fit", "--config", "missing.yaml")
    assert (code, lines) == (2, [f"error: config file {workdir / 'missing.yaml'} does not exist"])
    assert sorted(p.name for p in workdir.iterdir()) == ["typo.yaml"]


def test_help_still_prints_the_usage(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["fit", "--help"])
    assert stopped.value.code == 0
    assert "--trainer.max_steps" in capsys.readouterr().out


# --- errors found while the run starts: exit code 1, nothing left behind --------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--model.init_args.adapters=[{targets: [mlp.nothing_here], adapter: {kind: lora}}]"],
            "error: target pattern 'mlp.nothing_here' matched no module of LlamaForCausalLM",
        ),
        (
            ["--model.init_args.optimizer.init_args.lr=.nan"],
            "error: the optimizer refuses its settings: Invalid learning rate: nan",
        ),
        (["--data.init_args.train_size=0"], "error: SyntheticTextDataModule has no training examples"),
    ],
    ids=["unmatched target", "nan learning rate", "empty training split"],
)
def test_a_run_that_fails_as_it_starts_leaves_nothing_and_its_correction_runs(workdir, capsys, args, message):
    fixed = "--trainer.logger.init_args.version=fixed"
    code, lines = cli_error(capsys, "fit", "--config", SMOKE, *SMALL, fixed, *args)
    assert code == 1 and len(lines) == 1 and lines[0].startswith(message), lines
    assert not list(workdir.iterdir())  # no config.yaml, event file or version folder
    cli = fit(fixed, "--trainer.max_steps=2")  # the corrected command, same run folder
    assert cli.trainer.global_step == 2
    assert (workdir / "runs/smoke/mole_tiny_llama/fixed/adapter/adapter_config.json").is_file()


def test_an_empty_training_split_of_math_problems_names_why(workdir, capsys):
    problems = workdir / "problems.jsonl"
    problems.write_text('{"question": "1 + 1?", "answer": "2\\n#### 2"}\n')
    config = str(REPO / "configs/reasoning/lora_smollm2.yaml")
    tiny = ["--model.init_args.model=null", '--model.init_args.model_config={"model_type": "llama", '
            '"vocab_size": 259, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, '
            '"num_attention_heads": 2, "num_key_value_heads": 1}', "--data.init_args.tokenizer=bytes"]  # fmt: skip
    files = [f"--data.init_args.{split}_file={problems}" for split in ("train", "val", "test")]
    code, lines = cli_error(capsys, "fit", "--config", config, *tiny, *files)
    assert code == 1 and lines == [
        "error: MathDataModule has no training examples: all 1 training problems also appear in the "
        "validation or test split; fit needs at least one"
    ]
    assert sorted(p.name for p in workdir.iterdir()) == ["problems.jsonl"]


# --- checkpoints that are not checkpoints ------------------------------------------------------------
def _write_adapter_folder(folder: Path) -> None:
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_text("hi\n"), "is not a checkpoint (not a torch zip archive)"),
        (lambda p: save_file({"a": torch.zeros(2)}, p), "is a safetensors file (adapter weights?)"),
        (lambda p: None, "does not exist"),
        (_write_adapter_folder, "is an adapter folder, not a checkpoint; start from it with"),
    ],
    ids=["text file", "safetensors file", "missing file", "adapter folder"],
)
def test_a_ckpt_path_that_is_not_a_checkpoint_is_one_error(workdir, capsys, make, message):
    path = workdir / "x.ckpt"
    make(path)
    before = files_under(workdir)
    code, lines = cli_error(capsys, "fit", "--config", SMOKE, f"--ckpt_path={path}")
    assert code == 1 and len(lines) == 1 and message in lines[0] and str(path) in lines[0], lines
    assert "adapter_path" in lines[0]
    assert files_under(workdir) == before


def test_a_damaged_checkpoint_is_one_error(workdir, capsys):
    fit("--trainer.max_steps=2", "--trainer.logger.init_args.version=good")
    last = workdir / "runs/smoke/mole_tiny_llama/good/checkpoints/last.ckpt"
    damaged = workdir / "damaged.ckpt"
    data = bytearray(last.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # a damaged block inside a stored entry
    damaged.write_bytes(bytes(data))
    code, lines = cli_error(capsys, "fit", "--config", SMOKE, f"--ckpt_path={damaged}")
    assert code == 1 and len(lines) == 1 and "is damaged" in lines[0], lines


# --- non-finite training -----------------------------------------------------------------------------
def test_a_diverging_run_stops_at_its_step_and_writes_nothing_non_finite(workdir, capsys):
    every_step = checkpoint_every(1)
    code, lines = cli_error(
        capsys,
        "fit",
        "--config",
        SMOKE,
        *SMALL,
        "--model.init_args.optimizer.init_args.lr=1e30",
        every_step,
        "--trainer.max_steps=8",
    )
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith("error: training stopped at step 1: the task_loss is nan"), lines
    (run,) = (workdir / "runs/smoke/mole_tiny_llama").iterdir()  # kept: it trained a step
    assert not (run / "adapter").exists()  # no export of a diverged adapter
    checkpoints = sorted((run / "checkpoints").glob("*.ckpt"))
    assert checkpoints  # the checkpoint of step 1 (finite, if useless) stays
    for path in checkpoints:
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(value).all() for value in state.values())


def test_a_non_finite_gradient_stops_before_the_optimizer_applies_it(tiny_llama_config):
    from lightning_moe.errors import NonFiniteError
    from lightning_moe.non_finite import stop_on_non_finite_gradients

    task = tiny_causal_lm_task(tiny_llama_config)
    trainable = [p for p in task.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.grad = torch.zeros_like(parameter)
    stop_on_non_finite_gradients(task, trainable)  # finite: no error
    trainable[1].grad[0, 0] = float("inf")
    name = next(n for n, p in task.named_parameters() if p is trainable[1])
    with pytest.raises(NonFiniteError, match=rf"step 0: the gradient of {name} is non-finite"):
        stop_on_non_finite_gradients(task, trainable)


def test_the_adapter_writer_refuses_non_finite_tensors(workdir):
    from lightning_moe.adapters import AdapterCheckpointError
    from lightning_moe.adapters.files import write_folder_files

    with pytest.raises(AdapterCheckpointError, match=r"refusing to write .*'b' holds non-finite values"):
        write_folder_files(
            workdir / "a",
            {"adapter_model.safetensors": {"a": torch.zeros(2), "b": torch.tensor([1.0, float("nan")])}},
            {},
        )
    assert not (workdir / "a").exists()


# --- processes killed while they write -------------------------------------------------------------
KILL_DRIVER = """
import os, signal, sys
import torch
import {module} as target

real = target.{function}
calls = []

def killed_while_writing(obj, destination, *args, **kwargs):
    # write the object, then keep only half of it on disk and die as a SIGKILL would leave it
    real(obj, destination, *args, **kwargs)
    calls.append(destination)
    if len(calls) == {kill_at}:
        handle_or_path = destination
        if hasattr(handle_or_path, "flush"):
            handle_or_path.flush()
            os.truncate(handle_or_path.name, os.path.getsize(handle_or_path.name) // 2)
        else:
            os.truncate(handle_or_path, os.path.getsize(handle_or_path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)

target.{function} = killed_while_writing
from lightning_moe.cli import main
main(sys.argv[1:])
"""


def run_killed(workdir: Path, module: str, function: str, kill_at: int, *args: str) -> int:
    driver = workdir / "driver.py"
    driver.write_text(textwrap.dedent(KILL_DRIVER.format(module=module, function=function, kill_at=kill_at)))
    command = [sys.executable, str(driver), "fit", "--config", SMOKE, *SMALL, *args]
    env = os.environ | {"PYTHONPATH": str(REPO)}
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, timeout=600).returncode


def test_a_run_killed_while_writing_a_checkpoint_keeps_the_previous_one(workdir):
    run = workdir / "runs/smoke/mole_tiny_llama/killed"
    args = ["--trainer.logger.init_args.version=killed", "--trainer.max_steps=6"]
    args += [checkpoint_every(2)]
    # torch.save calls: step 2 writes epoch=0-step=2.ckpt and last.ckpt; the kill hits step 4's first
    code = run_killed(workdir, "torch", "save", 3, *args)
    assert code == -signal.SIGKILL
    last = run / "checkpoints/last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2
    assert not (run / "checkpoints/epoch=0-step=4.ckpt").exists()
    cli = fit(*args, f"--ckpt_path={last}")  # the rerun resumes and finishes
    assert cli.trainer.global_step == 6
    assert torch.load(last, weights_only=True)["global_step"] == 6


def test_a_run_killed_while_writing_its_adapter_keeps_the_previous_files(workdir):
    run = workdir / "runs/smoke/mole_tiny_llama/killed"
    args = ["--trainer.logger.init_args.version=killed", "--trainer.max_steps=2"]
    code = run_killed(workdir, "lightning_moe.adapters.files", "save_file", 1, *args)
    assert code == -signal.SIGKILL
    assert not (run / "adapter").exists()  # no half-written adapter folder
    last = run / "checkpoints/last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    cli = fit(*args, f"--ckpt_path={last}")  # the rerun resumes (at max_steps) and exports
    assert cli.trainer.global_step == 2
    exported = read_safetensors(run / "adapter/adapter_model.safetensors")
    for key, value in checkpoint["state_dict"].items():
        assert torch.equal(exported[key.removeprefix("model.").replace(".adapter.", ".")], value)


SAVE_SCRIPT = """
import sys
import torch
from lightning_moe.adapters import AdapterRule, LoraConfig, inject, save_adapter
from lightning_moe.tasks.reasoning.causal_lm import build_causal_lm

model = build_causal_lm(None, {config!r}, 0, torch.float32)
rules = [AdapterRule(["self_attn.q_proj"], LoraConfig(rank=4))]
inject(model, rules)
torch.manual_seed(int(sys.argv[1]))
for parameter in model.parameters():
    if parameter.requires_grad:
        parameter.data.normal_()
save_adapter(model, rules, "saved", overwrite=True)
"""


def test_an_adapter_replaced_by_a_killed_writer_stays_whole(workdir, tiny_llama_config):
    """save_adapter(..., overwrite=True) killed mid-write leaves the previous adapter whole and loadable."""
    from lightning_moe.tasks.reasoning.causal_lm import build_causal_lm

    script = SAVE_SCRIPT.format(config=tiny_llama_config)
    env = os.environ | {"PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", script, "1"], cwd=workdir, env=env, check=True, timeout=300)
    before = files_under(workdir / "saved")
    killer = KILL_DRIVER.format(module="lightning_moe.adapters.files", function="save_file", kill_at=1)
    killer = killer.replace("from lightning_moe.cli import main\nmain(sys.argv[1:])", script)
    killed = subprocess.run([sys.executable, "-c", killer, "2"], cwd=workdir, env=env, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert files_under(workdir / "saved") == before
    load_adapter(build_causal_lm(None, tiny_llama_config, 0, torch.float32), workdir / "saved")


# --- two processes, one cache ---------------------------------------------------------------------
CACHE_DRIVER = """
import sys, time
from pathlib import Path
{setup}
print("done", result)
"""


def run_together(workdir: Path, setup: str) -> list[subprocess.CompletedProcess]:
    driver = workdir / "cache_driver.py"
    driver.write_text(CACHE_DRIVER.format(setup=textwrap.dedent(setup)))
    env = os.environ | {"PYTHONPATH": str(REPO)}
    processes = [
        subprocess.Popen([sys.executable, str(driver)], cwd=workdir, env=env, stdout=subprocess.PIPE)
        for _ in range(2)
    ]
    for process in processes:
        process.wait(timeout=300)
    return processes


def test_two_processes_converting_the_same_model_both_get_it(workdir):
    (workdir / "model.gguf").write_bytes(b"GGUF" + bytes(60))
    setup = """
    import json, torch
    from safetensors.torch import save_file
    from lightning_moe import assets

    def slow_convert(source, target):
        with open("conversions.log", "a") as log:
            log.write("converting\\n")
        time.sleep(3)  # long enough for the other process to arrive and wait
        save_file({"weight": torch.zeros(4)}, target / "model.safetensors")
        files = {p.name: p.stat().st_size for p in target.iterdir()}
        (target / assets.MANIFEST).write_text(json.dumps({"source": assets._source_identity(source), "files": files}))

    assets._convert_gguf = slow_convert
    result = assets.converted_gguf_folder(Path("model.gguf"), Path("cache/model"))
    """
    processes = run_together(workdir, setup)
    assert [p.returncode for p in processes] == [0, 0]
    assert (workdir / "conversions.log").read_text() == "converting\n"  # built once, the other waited
    assert assets_folder_is_complete(workdir / "cache/model", workdir / "model.gguf")


def assets_folder_is_complete(folder: Path, source: Path) -> bool:
    from lightning_moe.assets import folder_problem

    return folder_problem(folder, source) is None


def test_two_processes_fetching_fashion_mnist_both_get_it(workdir):
    setup = """
    import subprocess
    from lightning_moe.data import image_sources

    def fake_run(command, cwd=None, **kwargs):
        # apt-get download writes the .deb; dpkg -x unpacks the IDX files (here: empty stand-ins)
        if command[0] == "apt-get":
            with open("fetches.log", "a") as log:
                log.write("fetching\\n")
            time.sleep(3)
            (Path(cwd) / "dataset-fashion-mnist_1.0_all.deb").write_bytes(b"deb")
        else:
            target = Path(command[-1]) / "usr/share/datasets/fashion-mnist"
            target.mkdir(parents=True)
            for pair in image_sources.FASHION_FILES.values():
                for name in pair:
                    (target / name).write_bytes(b"idx")
        return subprocess.CompletedProcess(command, 0)

    image_sources.subprocess.run = fake_run
    result = image_sources.fetch_fashion_mnist(Path("cache"))
    """
    processes = run_together(workdir, setup)
    assert [p.returncode for p in processes] == [0, 0]
    assert (workdir / "fetches.log").read_text() == "fetching\n"
    assert sorted(p.name for p in (workdir / "cache/fashion-mnist").iterdir()) == sorted(
        name for pair in (("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
                          ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")) for name in pair
    )  # fmt: skip

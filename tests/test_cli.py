"""The CLI's own behaviour: one clear error line for bad input (see also test_reliability.py)."""

import pytest

from lightning_moe.cli import main
from tests.tiny import REPO


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

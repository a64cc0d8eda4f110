"""Adapter folders on disk: `adapter_config.json` + `adapter_model.safetensors`.

Reading and writing them (atomically, never unpickling), their content hash, and the small
fingerprint of a base layer (shape and first values) that ties an adapter to its base model.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .errors import AdapterCheckpointError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT = "lightning_moe.adapter"
FORMAT_VERSION = 1
_FINGERPRINT_VALUES = 16


def write_adapter_folder(
    folder: str | os.PathLike, tensors: dict[str, Tensor], config: dict, overwrite: bool = False
) -> Path:
    """Write CONFIG_FILE + WEIGHTS_FILE atomically; an existing adapter is replaced only with `overwrite`."""
    return write_folder_files(
        folder, {WEIGHTS_FILE: tensors}, {CONFIG_FILE: json.dumps(config, indent=2)}, overwrite
    )


def write_folder_files(
    folder: str | os.PathLike,
    weights: dict[str, dict[str, Tensor]],
    texts: dict[str, str],
    overwrite: bool = False,
) -> Path:
    """Write safetensors files (name -> tensors) and text files (name -> content) into `folder`
    as one step: they are written into a staging folder beside it, which then replaces `folder`
    (`replace_folder`), so a reader, or a process killed mid-write, sees the old folder or the
    new one, never a mix. Other files already in `folder` are carried over. If any of the named
    files exists, nothing is written unless `overwrite`. Non-finite tensors are refused."""
    folder = Path(folder)
    names = [*weights, *texts]
    if not overwrite and any((folder / name).exists() for name in names):
        raise FileExistsError(f"{folder} already holds an adapter; pass overwrite=True to replace it")
    for name, tensors in weights.items():
        check_finite(tensors, f"{folder / name}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in folder.parent.glob(f".{folder.name}.staging-*"):  # left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.staging-", dir=folder.parent))
    try:
        for name, tensors in weights.items():
            tensors = {key: value.detach().contiguous().cpu() for key, value in tensors.items()}
            save_file(tensors, staging / name, metadata={"format": "pt"})
        for name, text in texts.items():
            (staging / name).write_text(text)
        if folder.is_dir():
            for entry in folder.iterdir():
                if entry.name not in names:
                    _link_into(entry, staging / entry.name)
        replace_folder(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def check_finite(tensors: dict[str, Tensor], where: str) -> None:
    """Refuse to write a tensor with NaN or infinite values."""
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise AdapterCheckpointError(f"refusing to write {where}: tensor {key!r} holds non-finite values")


def _link_into(source: Path, target: Path) -> None:
    """A hard-linked copy (no data copied) of a file or folder tree."""
    if source.is_dir():
        shutil.copytree(source, target, copy_function=os.link)
    else:
        os.link(source, target)


def replace_folder(staged: Path, target: Path) -> None:
    """Put the folder `staged` at `target` in one step and remove the previous `target`.

    A new target is one rename. An existing one is swapped with `staged` atomically where the
    system can (Linux renameat2 RENAME_EXCHANGE); elsewhere it is first renamed aside, so a crash
    between the two renames leaves the previous folder whole under `.<name>.previous-*`.
    """
    if not target.exists():
        os.rename(staged, target)
        return
    if _exchange(staged, target):
        shutil.rmtree(staged)  # now the previous folder
        return
    previous = Path(tempfile.mkdtemp(prefix=f".{target.name}.previous-", dir=target.parent))
    os.rename(target, previous / target.name)
    os.rename(staged, target)
    shutil.rmtree(previous)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    done = renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange)
    return done == 0


def read_config_object(folder: Path, what: str) -> dict:
    """The JSON object in `folder`/CONFIG_FILE, or an AdapterCheckpointError saying what is wrong."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterCheckpointError(f"no {CONFIG_FILE} in {what} folder {folder}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterCheckpointError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise AdapterCheckpointError(f"{path} holds a JSON {type(config).__name__}, expected an object")
    return config


def is_our_adapter(config: dict) -> bool:
    return config.get("format") == FORMAT


def read_adapter_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / CONFIG_FILE
    config = read_config_object(Path(folder), "adapter")
    if not is_our_adapter(config):
        raise AdapterCheckpointError(
            f"{path} is not a lightning_moe adapter (format {config.get('format')!r}, "
            f"expected {FORMAT!r}); PEFT adapters load with import_peft()"
        )
    if config.get("version") != FORMAT_VERSION:
        raise AdapterCheckpointError(
            f"{path} has format version {config.get('version')!r}; expected {FORMAT_VERSION}"
        )
    return config


def read_safetensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise AdapterCheckpointError(f"adapter weights file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open has no iterator)
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterCheckpointError(f"{path} is not a readable safetensors file: {error}") from error


def folder_sha256(folder: Path) -> str:
    """Hash of the config and weights files together: any change to either changes it."""
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        with (folder / name).open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def weight_fingerprint(weight: Tensor) -> dict:
    head = weight.detach().flatten()[:_FINGERPRINT_VALUES].float().cpu().tolist()
    return {"shape": list(weight.shape), "head": head}


def check_weight_fingerprint(name: str, weight: Tensor, expected: dict, source: str) -> None:
    """Refuse an adapter recorded for a base layer `name` shaped or valued differently from `weight`."""
    compare_fingerprints(name, weight_fingerprint(weight), expected, source)


def compare_fingerprints(name: str, actual: dict, expected: dict, source: str) -> None:
    if actual["shape"] != expected["shape"]:
        raise AdapterCheckpointError(
            f"{source} was saved for a base whose {name!r} has shape {expected['shape']}, "
            f"this model's is {actual['shape']}"
        )
    if not torch.allclose(torch.tensor(actual["head"]), torch.tensor(expected["head"]), rtol=2e-2, atol=1e-6):
        raise AdapterCheckpointError(
            f"{source} was saved from a different base model: the weights of {name!r} differ"
        )

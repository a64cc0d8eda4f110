"""Folders of safetensors and text files, written as one step and read without unpickling: the
adapter folders (see adapter_folder.py) and every other weights folder the application saves."""

from __future__ import annotations

import ctypes
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
        raise FileExistsError(f"{folder} already holds {', '.join(names)}; pass overwrite=True to replace it")
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


def read_json_object(path: Path, what: str) -> dict:
    """The JSON object in file `path`, or an AdapterCheckpointError saying what is wrong."""
    if not path.is_file():
        raise AdapterCheckpointError(f"no {path.name} in {what} folder {path.parent}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterCheckpointError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise AdapterCheckpointError(f"{path} holds a JSON {type(config).__name__}, expected an object")
    return config


def read_safetensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise AdapterCheckpointError(f"weights file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open has no iterator)
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterCheckpointError(f"{path} is not a readable safetensors file: {error}") from error

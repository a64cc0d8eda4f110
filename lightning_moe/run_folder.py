"""What a run may find and leave in its folder: the checks before it starts, and the clean-up when
it fails before its first training step.

- `check_checkpoint_path`: `--ckpt_path` must be a Lightning checkpoint (a torch zip archive, or
  the folder of a sharded one); an adapter folder or a safetensors file gets a pointer to
  `adapter_path` instead.
- `check_earlier_run`: a run folder that already holds a run (its config.yaml) is never reused,
  unless the checkpoint being resumed lies inside it.
- `failed_start_cleanup`: Lightning creates the logger's event file, config.yaml and the version
  folder while it sets up, before the model is even built. If the run then fails before its
  first optimizer step (a bad target pattern, an optimizer that refuses its settings, a NaN at
  step 0), exactly the files and folders this attempt created are removed, so the corrected
  command can run again. Anything that was there before stays.
"""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lightning_moe.errors import UserInputError

CONFIG_FILE = "config.yaml"
# `ckpt_path` values Lightning resolves itself
SPECIAL_CHECKPOINTS = {"last", "best", "hpc"}
ADAPTER_HINT = "to start from a saved adapter folder instead, pass --model.init_args.adapter_path=<folder>"


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with the 8-byte length of a JSON header."""
    with path.open("rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 0 < length < path.stat().st_size and head[8:9] == b"{"


def check_checkpoint_path(ckpt_path: str | None) -> None:
    """One clear error unless `ckpt_path` is a readable Lightning checkpoint (or unset / special)."""
    if not ckpt_path or ckpt_path in SPECIAL_CHECKPOINTS or "://" in ckpt_path:
        return
    if ckpt_path.startswith("registry"):
        return
    path = Path(ckpt_path)
    expected = "expected a Lightning checkpoint (a .ckpt file written by ModelCheckpoint, or a sharded checkpoint folder)"
    if not path.exists():
        raise UserInputError(f"--ckpt_path {path} does not exist; {expected}; {ADAPTER_HINT}")
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            raise UserInputError(
                f"--ckpt_path {path} is an adapter folder, not a checkpoint; start from it with "
                f"--model.init_args.adapter_path={path}"
            )
        if not (path / ".metadata").is_file():
            raise UserInputError(
                f"--ckpt_path {path} is a folder without a sharded checkpoint in it; {expected}"
            )
        return
    if _is_safetensors(path):
        raise UserInputError(
            f"--ckpt_path {path} is a safetensors file (adapter weights?), not a checkpoint; start from its adapter "
            f"folder with --model.init_args.adapter_path={path.parent}"
        )
    problem = _zip_problem(path)
    if problem:
        raise UserInputError(f"--ckpt_path {path} {problem}; {expected}; {ADAPTER_HINT}")


def _zip_problem(path: Path) -> str | None:
    if not zipfile.is_zipfile(path):
        return "is not a checkpoint (not a torch zip archive)"
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("/data.pkl") or name == "data.pkl" for name in archive.namelist()):
                return "is a zip archive but not a torch checkpoint (no data.pkl)"
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError) as error:
        return f"is damaged ({error})"
    return f"is damaged (entry {damaged} fails its checksum)" if damaged else None


def run_folder(trainer: L.Trainer) -> Path | None:
    """The folder this run's logger writes to, or None when there is no logger (nothing of ours
    to check or clean there)."""
    if not trainer.loggers:
        return None
    return Path(trainer.log_dir) if trainer.log_dir else None


def check_earlier_run(folder: Path | None, ckpt_path: str | None) -> bool:
    """Refuse a folder that holds an earlier run; returns True when this run resumes that run."""
    if folder is None or not (folder / CONFIG_FILE).is_file():
        return False
    if ckpt_path and Path(ckpt_path).resolve().is_relative_to(folder.resolve()):
        return True
    last = next(iter(sorted(folder.rglob("last*.ckpt"))), None)
    resume = f", or resume it with --ckpt_path={last}" if last else ""
    raise UserInputError(
        f"{folder} already holds a run ({CONFIG_FILE} exists); choose another run folder, e.g. "
        f"--trainer.logger.init_args.version=<new name>{resume}"
    )


def _contents(folder: Path) -> set[Path]:
    return set(folder.rglob("*")) if folder.exists() else set()


@contextmanager
def failed_start_cleanup(trainer: L.Trainer, folder: Path | None) -> Iterator[None]:
    """Run the body; if it fails before the first optimizer step, remove what it created in
    `folder`, and the folder and its parents if it created them and they are left empty; then
    re-raise."""
    if folder is None or rank_zero_only.rank != 0:
        yield
        return
    new_folders = [folder, *folder.parents]
    new_folders = new_folders[: next(i for i, path in enumerate(new_folders) if path.exists())]
    before = _contents(folder)
    try:
        yield
    except BaseException:
        if trainer.global_step == 0:
            _remove_new(folder, before)
            for path in new_folders:  # innermost first
                if path.is_dir() and not any(path.iterdir()):
                    path.rmdir()
        raise


def _remove_new(folder: Path, before: set[Path]) -> None:
    """Delete the files and (emptied) folders under `folder` that are not in `before`."""
    for path in sorted(_contents(folder) - before, key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not path.is_symlink():
            if not any(path.iterdir()):
                path.rmdir()
        else:
            path.unlink(missing_ok=True)

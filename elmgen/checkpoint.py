"""Checkpoints: safetensors weights + JSON config, trainer state beside them, written atomically.

A run directory holds `checkpoints/step_XXXXXXXX/` folders and a `latest` file naming the newest.
Each folder is written under a temporary name, flushed to disk and renamed into place, so a crash
never leaves a half-written checkpoint behind the `latest` pointer. Every file is read as data only:
no checkpoint can run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from elmgen.errors import ElmgenError

WEIGHTS, EMA, CONFIG, TRAINER = "model.safetensors", "ema.safetensors", "config.json", "trainer.pt"
TMP_PREFIX = ".tmp_"  # every temporary elmgen writes starts with it, so leftovers of a crash are recognisable

# Types of the config.json entries elmgen writes (absent ones are not checked): an edited or foreign
# config fails here, in one line, rather than deep inside a loader.
CONFIG_TYPES = {"kind": str, "step": int, "tokenizer": dict, "model": dict, "classifier": dict, "data": dict,
                "codes": dict, "bits": int, "num_codes": (int, type(None)), "image_size": int, "channels": int,
                "grid": int, "class_names": list, "dataset": str}


UMASK = os.umask(0o022)  # read once (it can only be read by setting it) and restored at once
os.umask(UMASK)


def fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk: what a rename publishes must be there first."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """`write(f)` into a temporary beside `path`, fsync, rename: `path` holds its old content or all of the
    new, whatever happens (kill, power loss, full disk). A full or read-only disk is one clear error."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.")
    except OSError as e:
        raise ElmgenError(f"cannot write {path}: {e.strerror or e}; choose a writable folder") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)  # the mode a plain open() would give, not mkstemp's private 0600
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise ElmgenError(f"cannot write {path}: {e.strerror or e}; free disk space or choose a writable "
                              "folder, then re-run (finished work is kept)") from None
        raise
    fsync(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def remove_temporaries(folder: str | Path, *names: str) -> None:
    """Delete what killed writes left in `folder`: the temporaries of `names` (of every file if none are named;
    only for folders that elmgen alone writes into)."""
    for name in names or ("",):
        for p in Path(folder).glob(f"{TMP_PREFIX}{name}*"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _prune(root: Path, keep: int) -> None:
    """Delete all checkpoint folders but the newest `keep`, never the one `latest` names (a resume reads it)."""
    latest = (root / "latest").read_text(errors="replace").strip() if (root / "latest").is_file() else None
    folders = sorted(root.glob("step_*"))
    others = [p for p in folders if p.name != latest]
    spare = max(0, keep - (len(folders) - len(others)))
    for old in others[: max(0, len(others) - spare)]:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(run_dir: Path, step: int, weights: torch.nn.Module | dict[str, torch.Tensor], config: dict,
                    trainer_state: dict | None = None, keep: int = 2,
                    ema: dict[str, torch.Tensor] | None = None) -> Path:
    """A new checkpoint folder with the weights (a module or a state dict), their EMA if any, the
    config and the trainer state; keeps the newest `keep` folders.

    Older folders are pruned before the new one is written: with it, the disk holds at most `keep`
    checkpoints (two for keep=1, whose latest stays until its successor is published)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    _prune(root, keep - 1)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=TMP_PREFIX))
    try:
        if isinstance(weights, torch.nn.Module):
            weights = weights.state_dict()
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / WEIGHTS)
        if ema is not None:
            save_file({k: v.contiguous() for k, v in ema.items()}, tmp / EMA)
        (tmp / CONFIG).write_text(json.dumps({**config, "step": step}, indent=2))
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER)
        for f in tmp.iterdir():
            fsync(f)
        fsync(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:  # a full disk or an interrupt: leave nothing behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync(root)
    atomic_write_text(root / "latest", final.name)
    _prune(root, keep)
    return final


def resolve(path: str | Path) -> Path:
    """A checkpoint folder from a run folder, a `checkpoints/` folder or the checkpoint itself."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / WEIGHTS).is_file():
            return candidate
        latest = candidate / "latest"
        if latest.is_file():
            ckpt = candidate / latest.read_text(errors="replace").strip()
            if (ckpt / WEIGHTS).is_file():
                return ckpt
    raise ElmgenError(f"no checkpoint found at {path}; pass a run folder written by elmgen or a checkpoint folder")


def has_checkpoint(run_dir: str | Path) -> bool:
    try:
        resolve(run_dir)
        return True
    except ElmgenError:
        return False


def load_config(path: str | Path) -> dict:
    f = resolve(path) / CONFIG
    try:
        config = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ElmgenError(f"{f} is not valid JSON ({e}); re-train or re-export that checkpoint") from None
    if not isinstance(config, dict):
        raise ElmgenError(f"{f} is not a JSON object; re-train or re-export that checkpoint")
    for key, types in CONFIG_TYPES.items():
        # bool is an int to Python, not to JSON
        if key in config and (not isinstance(config[key], types) or isinstance(config[key], bool)):
            raise ElmgenError(f"{f}: {key!r} has the wrong type ({type(config[key]).__name__}); "
                              "re-train or re-export that checkpoint")
    return config


def load_tensors(f: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a truncated or malformed file is one clear error."""
    try:
        return load_file(f)
    except (SafetensorError, OSError) as e:
        raise ElmgenError(f"{f} is not a readable safetensors file ({e}); "
                          "re-train or re-export that checkpoint") from None


def load_state(path: str | Path, ema: bool = True) -> dict[str, torch.Tensor]:
    """A checkpoint's weights; with `ema`, its EMA parameters (if it has them) replace the trained ones."""
    ckpt = resolve(path)
    state = load_tensors(ckpt / WEIGHTS)
    if ema and (ckpt / EMA).is_file():
        state.update(load_tensors(ckpt / EMA))
    return state


def load_ema(path: str | Path) -> dict[str, torch.Tensor] | None:
    f = resolve(path) / EMA
    return load_tensors(f) if f.is_file() else None


def load_weights(path: str | Path, model: torch.nn.Module, ema: bool = True) -> None:
    """Load a checkpoint into `model`: its EMA weights when it has them and `ema`, else the trained ones."""
    missing, unexpected = model.load_state_dict(load_state(path, ema), strict=False)
    if missing or unexpected:
        raise ElmgenError(
            f"checkpoint {resolve(path)} does not match the model: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}; was it written for another config?"
        )


def load_trainer_state(path: str | Path) -> dict | None:
    """The optimizer state, step and RNG state of a checkpoint, read as tensors, numbers and strings only
    (weights_only): a planted pickle is refused, never run."""
    ckpt = resolve(path)
    f = ckpt / TRAINER
    if not f.is_file():
        return None
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError):
        state = None
    if not (isinstance(state, dict) and isinstance(state.get("optimizer"), dict) and isinstance(state.get("step"), int)
            and isinstance(state.get("rng"), torch.Tensor)):
        raise ElmgenError(f"{f} is not a plain elmgen trainer state (truncated, or it holds other Python objects) "
                          f"and will not be loaded; delete {ckpt} and start again without --resume")
    return state


def fingerprint(path: str | Path) -> str:
    """Short hash of a checkpoint's weights (and EMA): names the exact tokenizer a code file came from."""
    h, ckpt = hashlib.sha256(), resolve(path)
    for name in (WEIGHTS, EMA):
        if (ckpt / name).is_file():
            with open(ckpt / name, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]

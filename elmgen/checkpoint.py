"""Checkpoints: safetensors weights + JSON metadata, trainer state beside them, written atomically.

A run directory holds `checkpoints/step_XXXXXXXX/` folders and a `latest` file naming the newest.
Each folder is written under a temporary name, flushed to disk and renamed into place, so a crash
never leaves a half-written checkpoint behind the `latest` pointer. Every file is read as data only:
no checkpoint can run code.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from elmgen.errors import ElmgenError
from elmgen.io import TMP_PREFIX, atomic_write_text, file_hash, publish_folder

WEIGHTS, EMA, CONFIG, TRAINER = "model.safetensors", "ema.safetensors", "config.json", "trainer.pt"


@dataclass
class CheckpointMeta:
    """What a checkpoint's config.json says besides its step, for every kind of trained model; the fields a
    kind does not use stay None and are not written. `load_config` checks a file against these types, so an
    edited or foreign config fails there, in one line, rather than deep inside a loader."""

    kind: str  # "bae", "vq", "fsq" (tokenizers), "lm" or "classifier"
    tokenizer: dict | None = None  # tokenizers: the TokenizerConfig
    model: dict | None = None  # lm: the ModelConfig
    classifier: dict | None = None  # classifier: the ClassifierConfig
    data: dict | None = None  # tokenizers, classifier: the DataConfig trained on (its source an absolute path)
    codes: dict | None = None  # lm: the code folder's meta, with its path
    bits: int | None = None  # tokenizers: K, bits of one cell code
    num_codes: int | None = field(default=None, metadata={"nullable": True})  # tokenizers: size of the code space
    image_size: int | None = None
    channels: int | None = None
    grid: int | None = None  # tokenizers: cells per side of the code grid
    class_names: list | None = None
    dataset: str | None = None  # classifier: the name of the data set trained on
    total_steps: int | None = None  # the run's step count (under a time budget, the one it chose)

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def _json_types() -> dict[str, tuple[type, ...]]:
    """The types each config.json entry may have (absent entries are not checked), from CheckpointMeta."""
    hints = typing.get_type_hints(CheckpointMeta)
    types = {"step": (int,)}
    for f in dataclasses.fields(CheckpointMeta):
        allowed = typing.get_args(hints[f.name]) or (hints[f.name],)
        types[f.name] = allowed if f.metadata.get("nullable") else tuple(t for t in allowed if t is not type(None))
    return types


def _prune(root: Path, keep: int) -> None:
    """Delete all checkpoint folders but the newest `keep`, never the one `latest` names (a resume reads it)."""
    latest = (root / "latest").read_text(errors="replace").strip() if (root / "latest").is_file() else None
    folders = sorted(root.glob("step_*"))
    others = [p for p in folders if p.name != latest]
    spare = max(0, keep - (len(folders) - len(others)))
    for old in others[: max(0, len(others) - spare)]:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    run_dir: Path,
    step: int,
    weights: torch.nn.Module | dict[str, torch.Tensor],
    meta: CheckpointMeta,
    trainer_state: dict | None = None,
    keep: int = 2,
    ema: dict[str, torch.Tensor] | None = None,
) -> Path:
    """A new checkpoint folder with the weights (a module or a state dict), their EMA if any, the
    metadata and the trainer state; keeps the newest `keep` folders.

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
        (tmp / CONFIG).write_text(json.dumps({**meta.to_json(), "step": step}, indent=2))
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER)
        if final.exists():
            shutil.rmtree(final)
        publish_folder(tmp, final)
    except BaseException:  # a full disk or an interrupt: leave nothing behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
    for key, types in _json_types().items():
        # bool is an int to Python, not to JSON
        if key in config and (not isinstance(config[key], types) or isinstance(config[key], bool)):
            raise ElmgenError(
                f"{f}: {key!r} has the wrong type ({type(config[key]).__name__}); re-train or re-export that checkpoint"
            )
    return config


def load_tensors(f: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a truncated or malformed file is one clear error."""
    try:
        return load_file(f)
    except (SafetensorError, OSError) as e:
        raise ElmgenError(
            f"{f} is not a readable safetensors file ({e}); re-train or re-export that checkpoint"
        ) from None


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
    if not (
        isinstance(state, dict)
        and isinstance(state.get("optimizer"), dict)
        and isinstance(state.get("step"), int)
        and isinstance(state.get("rng"), torch.Tensor)
    ):
        raise ElmgenError(
            f"{f} is not a plain elmgen trainer state (truncated, or it holds other Python objects) "
            f"and will not be loaded; delete {ckpt} and start again without --resume"
        )
    return state


def fingerprint(path: str | Path) -> str:
    """Short hash of a checkpoint's weights (and EMA): names the exact tokenizer a code file came from."""
    ckpt = resolve(path)
    return file_hash(ckpt / WEIGHTS, ckpt / EMA)

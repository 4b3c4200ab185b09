"""Checkpoints: safetensors weights + JSON config, trainer state beside them, written atomically.

A run directory holds `checkpoints/step_XXXXXXXX/` folders and a `latest` file naming the newest.
Each folder is written under a temporary name and renamed into place, so a crash never leaves a
half-written checkpoint behind the `latest` pointer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from elmgen.errors import ElmgenError

WEIGHTS, EMA, CONFIG, TRAINER = "model.safetensors", "ema.safetensors", "config.json", "trainer.pt"


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, step: int, weights: torch.nn.Module | dict[str, torch.Tensor], config: dict,
                    trainer_state: dict | None = None, keep: int = 2,
                    ema: dict[str, torch.Tensor] | None = None) -> Path:
    """A new checkpoint folder with the weights (a module or a state dict), their EMA if any, the
    config and the trainer state; keeps the newest `keep` folders."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp_"))
    if isinstance(weights, torch.nn.Module):
        weights = weights.state_dict()
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / WEIGHTS)
    if ema is not None:
        save_file({k: v.contiguous() for k, v in ema.items()}, tmp / EMA)
    (tmp / CONFIG).write_text(json.dumps({**config, "step": step}, indent=2))
    if trainer_state is not None:
        torch.save(trainer_state, tmp / TRAINER)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(root / "latest", final.name)
    older = sorted(p for p in root.glob("step_*") if p != final)
    for old in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resolve(path: str | Path) -> Path:
    """A checkpoint folder from a run folder, a `checkpoints/` folder or the checkpoint itself."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / WEIGHTS).is_file():
            return candidate
        latest = candidate / "latest"
        if latest.is_file():
            ckpt = candidate / latest.read_text().strip()
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
    return json.loads((resolve(path) / CONFIG).read_text())


def load_state(path: str | Path, ema: bool = True) -> dict[str, torch.Tensor]:
    """A checkpoint's weights; with `ema`, its EMA parameters (if it has them) replace the trained ones."""
    ckpt = resolve(path)
    state = load_file(ckpt / WEIGHTS)
    if ema and (ckpt / EMA).is_file():
        state.update(load_file(ckpt / EMA))
    return state


def load_ema(path: str | Path) -> dict[str, torch.Tensor] | None:
    f = resolve(path) / EMA
    return load_file(f) if f.is_file() else None


def load_weights(path: str | Path, model: torch.nn.Module, ema: bool = True) -> None:
    """Load a checkpoint into `model`: its EMA weights when it has them and `ema`, else the trained ones."""
    missing, unexpected = model.load_state_dict(load_state(path, ema), strict=False)
    if missing or unexpected:
        raise ElmgenError(
            f"checkpoint {resolve(path)} does not match the model: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}; was it written for another config?"
        )


def load_trainer_state(path: str | Path) -> dict | None:
    f = resolve(path) / TRAINER
    return torch.load(f, weights_only=False) if f.is_file() else None


def fingerprint(path: str | Path) -> str:
    """Short hash of a checkpoint's weights (and EMA): names the exact tokenizer a code file came from."""
    h, ckpt = hashlib.sha256(), resolve(path)
    for name in (WEIGHTS, EMA):
        if (ckpt / name).is_file():
            with open(ckpt / name, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]

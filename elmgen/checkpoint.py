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

WEIGHTS, CONFIG, TRAINER = "model.safetensors", "config.json", "trainer.pt"


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, config: dict,
                    trainer_state: dict | None = None, keep: int = 2) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp_"))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, tmp / WEIGHTS)
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


def load_weights(path: str | Path, model: torch.nn.Module) -> None:
    ckpt = resolve(path)
    state = load_file(ckpt / WEIGHTS)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ElmgenError(
            f"checkpoint {ckpt} does not match the model: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}; was it written for another config?"
        )


def load_trainer_state(path: str | Path) -> dict | None:
    f = resolve(path) / TRAINER
    return torch.load(f, weights_only=False) if f.is_file() else None


def fingerprint(path: str | Path) -> str:
    """Short hash of a checkpoint's weights: names the exact tokenizer a code file came from."""
    h = hashlib.sha256()
    with open(resolve(path) / WEIGHTS, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]

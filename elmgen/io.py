"""Files as elmgen writes and reads them: atomic writes, folder publishing, hashing, JSON and metrics rows.

Every output is written under a temporary name beside its destination, flushed to disk and renamed into
place, so a kill or a full disk never leaves a half-written file where a finished one is expected.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np

from elmgen.errors import ElmgenError

TMP_PREFIX = ".tmp_"  # every temporary elmgen writes starts with it, so leftovers of a crash are recognisable
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
            raise ElmgenError(
                f"cannot write {path}: {e.strerror or e}; free disk space or choose a writable "
                "folder, then re-run (finished work is kept)"
            ) from None
        raise
    fsync(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_save_npy(path: str | Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, array))


def atomic_savez(path: str | Path, *arrays, **named) -> None:
    """An uncompressed .npz (`arr_0`, `arr_1`, ... then the named arrays), written atomically."""
    atomic_write(path, lambda f: np.savez(f, *arrays, **named))


def publish_folder(tmp: Path, final: Path) -> None:
    """Rename a finished folder into place: every file and folder in it is flushed first, the rename itself
    after, so a crash never publishes a folder whose files are still only in memory."""
    for p in sorted(tmp.rglob("*"), key=lambda p: p.is_dir()):  # files, then the folders that list them
        fsync(p)
    fsync(tmp)
    os.replace(tmp, final)
    fsync(final.parent)


def remove_temporaries(folder: str | Path, *names: str) -> None:
    """Delete what killed writes left in `folder`: the temporaries of `names` (of every file if none are named;
    only for folders that elmgen alone writes into)."""
    for name in names or ("",):
        for p in Path(folder).glob(f"{TMP_PREFIX}{name}*"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def file_hash(*paths: str | Path) -> str:
    """Short sha256 of the files' bytes, in order; absent files are skipped."""
    h = hashlib.sha256()
    for path in paths:
        if Path(path).is_file():
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def read_json(path: Path):
    """The JSON value in `path`, or None when it is missing or not JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl. A malformed last line is what a kill mid-append leaves: it is dropped."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = [(i, line) for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if line.strip()]
    rows = []
    for i, line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not (isinstance(row, dict) and isinstance(row.get("step"), int)):
            if i == lines[-1][0]:
                break
            raise ElmgenError(f"{path}, line {i}, is not a metrics row; delete that line (or the file)")
        rows.append(row)
    return rows

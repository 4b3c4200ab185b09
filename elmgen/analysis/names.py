"""Names of runs in the analyses' tables and legends."""

from __future__ import annotations

from pathlib import Path


def run_names(paths) -> list[str]:
    """Short distinct names: the folder name, with its parent when two share it."""
    names = [Path(p).name for p in paths]
    return [f"{Path(p).parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names, strict=True)]

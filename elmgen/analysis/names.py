"""Names of runs in the analyses' tables and legends, and the files an analysis writes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from elmgen.io import atomic_write_text


def run_names(paths) -> list[str]:
    """Short distinct names: the folder name, with its parent when two share it."""
    names = [Path(p).name for p in paths]
    return [f"{Path(p).parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names, strict=True)]


def write_result(out_dir, stem: str, result: dict, plot: Callable[[dict, Path], None]) -> dict:
    """OUT/<stem>.json (the result) and OUT/<stem>.png (`plot(result, path)`); returns the result."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{stem}.json", json.dumps(result, indent=2))
    plot(result, out / f"{stem}.png")
    return result

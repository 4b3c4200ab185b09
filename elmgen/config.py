"""Dataclass configs, YAML files and `key=value` command-line overrides (via OmegaConf)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from elmgen.errors import ElmgenError

T = TypeVar("T")


def build_config(cls: type[T], yaml_path: str | Path | None = None, overrides=(), **base) -> T:
    """`cls` defaults <- `base` values <- YAML file <- `a.b=value` overrides, type-checked."""
    try:
        merged = OmegaConf.structured(cls)
        if base:
            merged = OmegaConf.merge(merged, base)
        if yaml_path is not None:
            path = Path(yaml_path)
            if not path.is_file():
                raise ElmgenError(f"config file not found: {path}")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        for item in overrides:
            if "=" not in item:
                raise ElmgenError(f"override {item!r} is not of the form key=value (e.g. train.steps=100)")
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ElmgenError(f"invalid config: {str(e).splitlines()[0]}") from None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], values: dict) -> T:
    """Rebuild a config saved with `to_dict` (unknown keys are an error, missing ones default)."""
    return build_config(cls, None, (), **values)


def save_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))

"""Dataclass configs, YAML files and `key=value` command-line overrides (via OmegaConf)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from elmgen.errors import ElmgenError
from elmgen.io import atomic_write_text

T = TypeVar("T")


def build_config(
    cls: type[T],
    yaml_path: str | Path | None = None,
    overrides=(),
    *,
    base: dict | None = None,
    flags: dict | None = None,
    labels: dict[str, str] | None = None,
) -> T:
    """`cls` defaults <- `base` values <- YAML file <- `a.b=value` overrides <- `flags` (nested values, e.g. from
    command-line options), type-checked; a problem is one line naming the key (or its label: `labels` maps a
    key to the name the user knows, e.g. an option). Old field names (RENAMED) are read as the new ones."""
    try:
        merged = OmegaConf.structured(cls)
        if base:
            merged = OmegaConf.merge(merged, renamed(base))
        if yaml_path is not None:
            merged = OmegaConf.merge(merged, load_yaml(Path(yaml_path)))
        for item in overrides:
            if "=" not in item:
                raise ElmgenError(f"override {item!r} is not of the form key=value (e.g. train.steps=100)")
        dotlist = [f"{current_name(key)}={value}" for key, value in (item.split("=", 1) for item in overrides)]
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(dotlist))
        if flags:
            merged = OmegaConf.merge(merged, flags)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            names = ", ".join((labels or {}).get(key, key) for key in missing)
            raise ElmgenError(f"{names} must be given (an option, key=value or a --config file)")
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = f"{e.full_key}: " if getattr(e, "full_key", None) else ""
        raise ElmgenError(f"invalid config: {key}{str(e).splitlines()[0]}") from None


# Fields renamed since configs were first written (old name -> new). Every key a config file, a saved config,
# an override or a sweep names is read through this map (each part of a dotted key), so old files still load.
RENAMED = {
    "cfg_scale": "guidance_scale",
    "cfg_schedule": "guidance_schedule",
    "cfg_power": "guidance_power",
    "cfg_interval": "guidance_interval",
}


def current_name(key: str) -> str:
    """A (dotted) config key in today's spelling: sample.cfg_scale -> sample.guidance_scale."""
    return ".".join(RENAMED.get(part, part) for part in key.split("."))


def renamed(node):
    """A config tree (dicts and lists) with every key in today's spelling."""
    if isinstance(node, dict):
        return {current_name(k) if isinstance(k, str) else k: renamed(v) for k, v in node.items()}
    if isinstance(node, list):
        return [renamed(v) for v in node]
    return node


def load_yaml(path: Path) -> DictConfig:
    """A config file: a YAML mapping of sections (`train: {steps: 100}`)."""
    if not path.is_file():
        raise ElmgenError(f"config file not found: {path}")
    try:
        loaded = OmegaConf.load(path)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ElmgenError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    except OSError as e:
        if e.errno:  # the file cannot be read: main() reports that, naming it
            raise
        loaded = None  # OmegaConf's refusal of a plain value (a number, a string) at the top level
    if not isinstance(loaded, DictConfig):
        raise ElmgenError(
            f"{path} does not hold a mapping of sections at its top level (a list or a plain value "
            "instead); write e.g. 'train: {steps: 100}'"
        )
    return OmegaConf.create(renamed(OmegaConf.to_container(loaded)))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], values: dict) -> T:
    """Rebuild a config saved with `to_dict` (unknown keys are an error, missing ones default)."""
    return build_config(cls, base=values)


def save_yaml(cfg: Any, path: str | Path) -> None:
    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.structured(cfg)))

"""What a command is: a config dataclass, a function, and options that are short ways to its keys."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Option:
    """A command-line option that sets one config key; names not starting with '-' make a positional argument."""

    names: tuple[str, ...]
    key: str
    const: object = None  # set this value when the option is given (it takes no argument)
    nargs: int | str | None = None
    metavar: str | tuple[str, ...] | None = None
    choices: tuple | None = None
    min: int | None = None  # integers below are refused (a field's metadata "min" gives it too)
    action: str | None = None  # "append": each use adds a list
    type: Callable | None = None  # parses the option's text (default: the field's type, with `min`)


@dataclass(frozen=True)
class Command:
    name: str  # "analyze attention": a sub-command of `analyze`
    config: type
    run: Callable
    help: str
    description: str
    options: tuple[Option, ...] = ()
    aliases: tuple[str, ...] = ()
    base: Callable | None = None  # values below the config file, from a first reading of the config
    config_positional: bool = False  # the config file is the first positional argument (sweep)


def defaults_of(function: Callable) -> dict:
    """A library function's keyword defaults: the commands that call it take theirs from here."""
    return {name: p.default for name, p in inspect.signature(function).parameters.items() if p.default is not p.empty}


def job_of(cmd, cls: type):
    """The `cls` part of a command config that extends `cls`: what is saved as the run's job."""
    return cls(**{f.name: getattr(cmd, f.name) for f in fields(cls)})


OUT = {"path": "folder"}  # metadata of output folders: refused before any work when they cannot be written


POSITIVE, NON_NEGATIVE = {"min": 1}, {"min": 0}


def named(*keys: str) -> tuple[Option, ...]:
    """Options named after the top-level keys they set: --per-class sets per_class."""
    return tuple(Option((f"--{key.replace('_', '-')}",), key) for key in keys)

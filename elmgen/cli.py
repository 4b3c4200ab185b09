"""`elmgen` command line, generated from the commands (`elmgen.commands`).

Each command's config dataclass gives its `--config FILE` and `key=value` overrides (dotted keys, as in sweep
files), its options (short ways to the most used keys) and its help: the fields' comments. Every failure the
user can fix is one line and exit status 2.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import sys
import tempfile
import textwrap
import tokenize
import typing
from pathlib import Path

from elmgen import __version__
from elmgen.commands import COMMANDS, GROUPS, Command, Option
from elmgen.config import build_config
from elmgen.errors import ElmgenError

OVERRIDES_HELP = "config keys to set, e.g. train.steps=500 (all keys: below)"


class Parser(argparse.ArgumentParser):
    """Usage errors are one line, as every other error (the full usage is one --help away). A command's parser
    ends its help with every key of its config, listed when the help is asked for."""

    config: type | None = None

    def error(self, message):
        self.exit(2, f"elmgen: error: {message} (see '{self.prog} --help')\n")

    def format_help(self) -> str:
        if self.config is not None and self.epilog is None:
            self.epilog = keys_help(self.config)
        return super().format_help()


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """The comment of each field of dataclass `cls` (its bases' fields too): on the field's lines and on the
    comment-only lines right below them."""
    comments = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        source = textwrap.dedent(inspect.getsource(klass))
        notes = {
            token.start[0]: token.string.lstrip("#").strip()
            for token in tokenize.generate_tokens(io.StringIO(source).readline)
            if token.type == tokenize.COMMENT
        }
        body = ast.parse(source).body[0].body
        for node, after in zip(body, [*body[1:], None], strict=True):
            if isinstance(node, ast.AnnAssign):
                stop = after.lineno if after is not None else len(source.splitlines()) + 1
                comments[node.target.id] = " ".join(notes[n] for n in range(node.lineno, stop) if n in notes)
    return comments


@functools.cache
def field_at(cls: type, key: str) -> tuple[type, dataclasses.Field, type]:
    """The dataclass that holds the dotted `key`, its field and the field's value type (without None)."""
    *parents, name = key.split(".")
    for part in parents:
        cls = typing.get_type_hints(cls)[part]
    hint = typing.get_type_hints(cls)[name]
    value_type = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
    return cls, {f.name: f for f in dataclasses.fields(cls)}[name], value_type


def int_at_least(lo: int):
    """An argparse type: an integer >= lo, or a one-line usage error naming the option."""

    def parse(text: str) -> int:
        value = int(text)  # a ValueError becomes argparse's "invalid int value"
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, not {value}")
        return value

    parse.__name__ = "int"
    return parse


def add_option(parser: argparse.ArgumentParser, config: type, option: Option) -> None:
    """The option's help is its field's comment and the key it sets."""
    owner, f, value_type = field_at(config, option.key)
    sets = f"{option.key}={option.const}" if option.const is not None else option.key
    kwargs = {"help": f"{field_comments(owner).get(f.name, '')} [{sets}]".lstrip().replace("%", "%%")}
    if option.const is not None:
        kwargs.update(action="store_const", const=option.const)
    else:
        item_type = typing.get_args(value_type)[0] if typing.get_origin(value_type) is list else value_type
        minimum = option.min if option.min is not None else f.metadata.get("min")
        kwargs["type"] = option.type or (int_at_least(minimum) if minimum is not None else item_type)
        kwargs["metavar"] = option.metavar or (None if option.choices else f.name.upper())
        for name in ("nargs", "choices", "action"):
            if getattr(option, name) is not None:
                kwargs[name] = getattr(option, name)
    if option.names[0].startswith("-"):
        parser.add_argument(*option.names, dest=option.key, default=argparse.SUPPRESS, **kwargs)
    else:
        parser.add_argument(option.key, **kwargs)


def config_keys(config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, comment) of every leaf field of a config instance, nested sections flattened."""
    rows = []
    comments = field_comments(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            rows += config_keys(value, f"{prefix}{f.name}.")
        else:
            rows.append((prefix + f.name, "(required)" if value == "???" else repr(value), comments.get(f.name, "")))
    return rows


def keys_help(config: type) -> str:
    rows = config_keys(config())
    width = max(len(key) + len(default) for key, default, _ in rows) + 3
    lines = [f"  {f'{key}={default}':<{width}} {comment}".rstrip() for key, default, comment in rows]
    return "config keys (key=value, or in a --config YAML file; options set the same keys):\n" + "\n".join(lines)


def add_command(sub, command: Command) -> None:
    p = sub.add_parser(
        command.name.split()[-1],
        aliases=command.aliases,
        help=command.help,
        description=textwrap.fill(command.description, 110),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.config = command.config
    if command.config_positional:
        p.add_argument("_config", metavar="CONFIG.yaml", help="the config file (YAML)")
    else:
        p.add_argument("--config", dest="_config", metavar="YAML", help="config file; options and KEY=VALUE win")
    for option in command.options:
        add_option(p, command.config, option)
    if any(o.nargs == "+" and not o.names[0].startswith("-") for o in command.options):
        p.set_defaults(_overrides=[])  # KEY=VALUE after the options (main collects them)
    else:
        p.add_argument("_overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    p.set_defaults(_command=command)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="elmgen",
        description="Language models for image generation: binary tokenizers, factorized vocabularies and "
        "autoregressive transformers (ELM, arXiv 2410.16257).",
    )
    p.add_argument("--version", action="version", version=f"elmgen {__version__}")
    sub = p.add_subparsers(dest="_name", required=True, metavar="COMMAND")
    groups = {}
    for command in COMMANDS:
        if " " in command.name:  # a sub-command: "analyze attention"
            group = command.name.split()[0]
            if group not in groups:
                metavar, text = GROUPS[group]
                parser = sub.add_parser(group, help=text, description=text)
                groups[group] = parser.add_subparsers(dest="_sub", required=True, metavar=metavar)
            add_command(groups[group], command)
        else:
            add_command(sub, command)
    return p


def check_writable(path: Path, folder: bool) -> str | None:
    """Why elmgen could not write its results to `path` (a file where a folder goes or the reverse, a file among
    its parents, a place it may not create files in), or None."""
    if path.exists() and path.is_dir() != folder:
        return f"{path} is a {'file' if folder else 'folder'}; pass a {'folder' if folder else 'file'} path"
    parent = path if folder else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot write {path}: {parent} is a file, not a folder"
    try:  # a real probe: permissions, read-only file systems and root's privileges all answer here
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        return f"cannot write {path}: {parent} is not writable ({e.strerror})"
    return None


def check_values(cfg, labels: dict[str, str]) -> None:
    """The checks its fields' metadata ask for: a minimum, an output path that can be written."""
    for f in dataclasses.fields(cfg):
        value, name = getattr(cfg, f.name), labels.get(f.name, f.name)
        if value is None:
            continue
        if "min" in f.metadata and value < f.metadata["min"]:
            raise ElmgenError(f"{name} must be at least {f.metadata['min']}, not {value}")
        problem = "path" in f.metadata and check_writable(Path(value), folder=f.metadata["path"] == "folder")
        if problem:
            raise ElmgenError(f"{name}: {problem}")


def run(command: Command, args: argparse.Namespace) -> None:
    """Build the command's config (defaults, base, --config file, KEY=VALUE, options), check it, run it."""
    flags: dict = {}
    for key, value in vars(args).items():
        if not key.startswith("_"):
            *parents, last = key.split(".")
            node = flags
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
    labels = {o.key: o.names[0] if o.names[0].startswith("-") else o.key for o in command.options}
    build = functools.partial(build_config, command.config, args._config, args._overrides, flags=flags, labels=labels)
    cfg = build()
    check_values(cfg, labels)
    if command.base is not None:
        cfg = build(base=command.base(cfg))
    command.run(cfg)


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse fills the overrides from the first run of positionals only: take key=value items after options too
    if extra and all("=" in e and not e.startswith("-") for e in extra):
        args._overrides = [*args._overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        run(args._command, args)
    except ElmgenError as e:
        print(f"elmgen: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path the user gave cannot be read or written: permissions, a full disk, ...
        where = f"{e.filename}: " if e.filename else ""
        print(f"elmgen: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("elmgen: interrupted; re-run with --resume (demo: the same command) to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

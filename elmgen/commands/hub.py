"""`elmgen import llamagen|elm FILE`: a released checkpoint as an elmgen run folder; `elmgen export RUN`: a
run as one folder to upload to the Hugging Face hub (docs/pretrained.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from omegaconf import MISSING

from elmgen.commands.base import OUT, POSITIVE, Command, Option, named
from elmgen.hub import SOURCES, import_checkpoint, save_pretrained


@dataclass
class ImportCommand:
    file: str = MISSING  # the released checkpoint file (.pt, .pth)
    out: str = field(default=MISSING, metadata=OUT)  # run folder to write (new)
    tokenizer: str | None = None  # GPT files: the imported tokenizer run they sample with (its grid and bits)
    heads: int | None = field(default=None, metadata=POSITIVE)  # GPT files of no known size: attention heads
    image_size: int = field(default=256, metadata=POSITIVE)  # tokenizer files: the image side (LlamaGen _384 GPTs: 384)


@dataclass
class ImportElmCommand(ImportCommand):
    deterministic: bool = False  # BAE files: the deterministic release (bae_16_deter); the others are Bernoulli


def import_command(source: str):
    def run(cmd: ImportCommand) -> None:
        options = {"deterministic": cmd.deterministic} if isinstance(cmd, ImportElmCommand) else {}
        out = import_checkpoint(
            source, cmd.file, cmd.out, tokenizer=cmd.tokenizer, n_head=cmd.heads, image_size=cmd.image_size, **options
        )
        print(json.dumps({"run": str(out), "source": SOURCES[source].hub, "file": cmd.file}))

    return run


@dataclass
class ExportCommand:
    run: str = MISSING  # a language-model or tokenizer run folder (or checkpoint)
    out: str = field(default=MISSING, metadata=OUT)  # folder to write (new or empty): upload it as a hub repository


def export_command(cmd: ExportCommand) -> None:
    print(json.dumps({"folder": str(save_pretrained(cmd.run, cmd.out))}))


IMPORT_HELP = "released checkpoints (LlamaGen, ELM) as elmgen run folders (see docs/pretrained.md)"
OPTIONS = (Option(("file",), "file"), *named("out", "tokenizer", "heads", "image_size"))
ELM_OPTIONS = (*OPTIONS, Option(("--deterministic",), "deterministic", const=True))

COMMANDS = tuple(
    Command(
        f"import {source}",
        config,
        import_command(source),
        f"{SOURCES[source].name}'s released tokenizer and GPT files as elmgen runs",
        f"Convert a {what} released on hf.co/{SOURCES[source].hub} into an elmgen run folder that sample, outpaint, "
        "inpaint and the analyses load: the weights read as tensors only (no pickle runs), the config "
        "inferred from their names and shapes. Import the tokenizer first: a GPT file needs --tokenizer, whose "
        "grid and bits it is checked against.",
        options,
    )
    for source, config, options, what in (
        ("llamagen", ImportCommand, OPTIONS, "VQ tokenizer (vq_ds16_c2i.pt) or c2i GPT (c2i_*.pt)"),
        ("elm", ImportElmCommand, ELM_OPTIONS, "BAE tokenizer (binaryae_ema.th) or AR/MLM GPT (gpt/*.pth)"),
    )
) + (
    Command(
        "export",
        ExportCommand,
        export_command,
        "a run as one folder for the Hugging Face hub (save_pretrained)",
        "Write a run's weights (EMA applied), config and model card into one folder; a language model takes its "
        "tokenizer along. Upload the folder as a hub repository; 'elmgen sample --model hf:ORG/NAME' loads it.",
        (Option(("run",), "run"), *named("out")),
    ),
)

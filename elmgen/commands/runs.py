"""Commands around whole runs: model sizes, the pipeline (run/demo), sweeps, and image folders."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING

from elmgen.checkpoint import load_config
from elmgen.commands.base import NON_NEGATIVE, OUT, POSITIVE, Command, Option, defaults_of, job_of, named
from elmgen.data import check_images, folder_images, inspect_folder
from elmgen.data.shapes import make_shapes
from elmgen.errors import ElmgenError
from elmgen.models import ModelConfig, count_params, flops_per_token, preset, sampling_cost, training_memory_gb
from elmgen.pipeline import PipelineConfig, SweepConfig, folder_config, quick_demo, run_demo, run_sweep
from elmgen.pipeline.stages import folder_recipe


@dataclass
class ModelInfoCommand(ModelConfig):
    preset: str = MISSING  # micro, tiny, small, B, L, XL, XXL, 2B, 3B or an LM run folder; model keys override it
    vocab: str = "2-12"  # vocabulary split N-C
    grid_size: int = field(default=16, metadata=POSITIVE)  # token grid side (16: 256 px at f=16)
    num_classes: int = field(default=1000, metadata=POSITIVE)
    batch_per_gpu: int = field(default=32, metadata=POSITIVE)  # for the memory estimate
    gpus: int = field(default=8, metadata=POSITIVE)  # for the sharded (FSDP) memory estimate
    json: bool = False  # print one JSON object


def model_info_command(cmd: ModelInfoCommand) -> None:
    cfg = job_of(cmd, ModelConfig)
    cfg.validate()
    memory = {
        mode: round(
            training_memory_gb(
                cfg,
                cmd.batch_per_gpu,
                cmd.gpus,
                sharded=mode.startswith("fsdp"),
                activation_checkpointing=mode.endswith("ckpt"),
            ),
            2,
        )
        for mode in ("ddp", "ddp_ckpt", "fsdp", "fsdp_ckpt")
    }
    sizes = ("n_layer", "d_model", "n_head", "vocab", "grid_size", "num_classes", "kind", "mlp_hidden")
    info = {
        "preset": cmd.preset,
        "params": count_params(cfg),
        **{k: getattr(cfg, k) for k in sizes},
        "flops_per_token": flops_per_token(cfg),
        "batch_per_gpu": cmd.batch_per_gpu,
        "gpus": cmd.gpus,
        "memory_gb_per_gpu": memory,
        "sampling_bf16_guided": sampling_cost(cfg),
    }
    if cmd.json:
        print(json.dumps(info))
    else:
        for k, v in info.items():
            print(f"{k:>18}: {v:,}" if isinstance(v, int) else f"{k:>18}: {v}")


def preset_base(cmd: ModelInfoCommand) -> dict:
    """The preset's sizes, or every model field of a run folder or checkpoint (e.g. an imported release)."""
    if Path(cmd.preset).exists():
        meta = load_config(cmd.preset)
        if meta.get("kind") != "lm":
            raise ElmgenError(f"{cmd.preset} is not a language-model run (kind {meta.get('kind')!r})")
        return meta["model"]
    return preset(cmd.preset)


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0, or a one-line usage error naming the option."""
    value = float(text)  # a ValueError becomes argparse's "invalid float value"
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number > 0, not {text}")
    return value


positive_float.__name__ = "float"


@dataclass
class RunCommand(PipelineConfig):
    out: str = field(default="demo", metadata=OUT)  # output folder (re-run to resume)
    data: str | None = None  # a folder with one sub-folder of images per class (default: Fashion-MNIST)
    image_size: int | None = None  # image side for `data`: 32, 64, 128 or 256 (default: the largest it supports)
    quick: bool = False  # a short smoke run on a data subset


def run_base(cmd: RunCommand) -> dict:
    """For a class folder: its channels and image size (detected, or `image_size`), below the config file."""
    if cmd.data is None:
        if cmd.image_size:
            raise ElmgenError("--image-size applies to --data DIR (Fashion-MNIST runs at 32 px)")
        return {}
    base, note = folder_config(cmd.data, cmd.image_size)
    print(f"elmgen run: {note}", file=sys.stderr)
    return base


def run_command(cmd: RunCommand) -> None:
    cfg = job_of(cmd, PipelineConfig)
    metrics = run_demo(quick_demo(cfg) if cmd.quick else cfg, cmd.out)
    print(json.dumps(metrics, indent=2))
    print(f"wrote {cmd.out}/report.md, samples.png, samples.npz, reconstructions.png, loss.png, metrics.json")


@dataclass
class SweepCommand(SweepConfig):
    out: str = field(default=MISSING, metadata=OUT)  # sweep folder (re-run to resume)


def sweep_base(cmd: SweepCommand) -> dict:
    """For a base on a class folder what `run --data` gives a folder (`folder_recipe`: channels detected, tokenizer
    levels for the base's image size, binarization, edge weight, views, sampling), below the sweep file, which may set
    any of them."""
    data = cmd.base.tokenizer.data
    if data.source == "fashion-mnist":
        return {}
    channels, _ = inspect_folder(data.source)
    print(
        f"elmgen sweep: {data.source}: {'colour' if channels == 3 else 'grey'} images at {data.image_size} px",
        file=sys.stderr,
    )
    return {"base": folder_recipe(channels, data.image_size)}


def sweep_command(cmd: SweepCommand) -> None:
    rows = run_sweep(job_of(cmd, SweepConfig), cmd.out)
    print(f"{len(rows)} runs; wrote {cmd.out}/summary.md, summary.csv, differences.csv, runs.csv and plots")


SHAPES = defaults_of(make_shapes)


@dataclass
class ShapesCommand:
    out: str = field(default=MISSING, metadata=OUT)  # folder to write (new or empty)
    classes: int = field(default=SHAPES["num_classes"], metadata=POSITIVE)  # number of shapes (2-6)
    per_class: int = field(default=SHAPES["per_class"], metadata=POSITIVE)  # images per shape
    size: int = field(default=SHAPES["size"], metadata=POSITIVE)  # image side in px
    seed: int = field(default=SHAPES["seed"], metadata=NON_NEGATIVE)  # colours, sizes, places, rotations
    palette: int = field(default=SHAPES["palette"], metadata=NON_NEGATIVE)  # colours from this many (2-8); 0: any
    jitter: float = SHAPES["jitter"]  # pose randomness, 0-1: 1 any size, place and tilt; 0 centred and upright


def shapes_command(cmd: ShapesCommand) -> None:
    out = make_shapes(cmd.out, cmd.classes, cmd.per_class, cmd.size, cmd.seed, cmd.palette, cmd.jitter)
    print(f"wrote {cmd.classes * cmd.per_class} images to {out}/<shape>/")


@dataclass
class CheckDataCommand:
    folder: str = MISSING  # a folder with one sub-folder per class
    workers: int | None = field(default=None, metadata=POSITIVE)  # decoding threads (default: one per core)


def check_data_command(cmd: CheckDataCommand) -> None:
    bad = check_images(cmd.folder, cmd.workers)
    for path, reason in bad:
        print(f"{path}: {reason}")
    summary = f"{len(folder_images(cmd.folder)[0])} files checked, {len(bad)} bad"
    if bad:
        raise ElmgenError(f"{summary}; remove or replace the files listed above")
    print(summary)


COMMANDS = (
    Command(
        "model-info",
        ModelInfoCommand,
        model_info_command,
        "parameters, FLOPs per token and memory of a preset or a run (no weights allocated)",
        "Parameter count (built on the meta device), training FLOPs per token and estimated memory per GPU under "
        "DDP / FSDP, with and without activation checkpointing. The formulas are in docs/scaling.md.",
        (
            Option(("preset",), "preset"),
            Option(("--grid",), "grid_size"),
            *named("vocab", "num_classes", "batch_per_gpu", "gpus"),
            Option(("--json",), "json", const=True),
        ),
        base=preset_base,
    ),
    Command(
        "run",
        RunCommand,
        run_command,
        "the whole pipeline on Fashion-MNIST or your images, with a report",
        "Train the BAE, tokenize, train an AR model (2-8 vocabulary), sample 10 images per class with guidance "
        "and evaluate them; writes report.md, samples.png, samples.npz, reconstructions.png, loss.png and "
        "metrics.json. Re-running resumes. With --data DIR: classes, class names, channels and image size come "
        "from the folder, and without a DIR/test folder a fixed 10% of each class is held out. Config file: "
        "configs/demo.yaml.",
        (
            *named("out"),
            Option(("--data",), "data", metavar="DIR"),
            Option(("--image-size",), "image_size", metavar="PX"),
            Option(("--minutes",), "minutes", metavar="N", type=positive_float),
            Option(("--quick",), "quick", const=True),
        ),
        aliases=("demo",),
        base=run_base,
    ),
    Command(
        "sweep",
        SweepCommand,
        sweep_command,
        "run a grid of pipeline runs sharing common stages",
        "Run every combination of the swept fields over a base pipeline config; shares tokenizers, code folders "
        "and models between runs, skips finished runs, writes summary.csv, summary.md and a plot per swept field. "
        "With --replicates N every setting runs N times with other seeds, and the summary gives means, 95% "
        "intervals and which settings differ significantly. Sweep files: configs/sweeps/.",
        (*named("out"), Option(("--replicates",), "replicates", metavar="N", min=1)),
        config_positional=True,
        base=sweep_base,
    ),
    Command(
        "shapes",
        ShapesCommand,
        shapes_command,
        "write a synthetic class folder of coloured shapes",
        "Coloured shapes on coloured backgrounds, one sub-folder per shape: the class is the shape, never the "
        "colour. A folder to try 'elmgen run --data' on.",
        named("out", "classes", "per_class", "size", "seed", "palette", "jitter"),
    ),
    Command(
        "check-data",
        CheckDataCommand,
        check_data_command,
        "decode every image of a class folder and list the bad ones",
        "Decode every image file of a class folder (and its train/ and test/ splits), in parallel, and list every "
        "file that does not decode and every class folder without images, with the reason; exits with status 2 "
        "if any is bad.",
        (Option(("folder",), "folder", metavar="DIR"), *named("workers")),
    ),
)

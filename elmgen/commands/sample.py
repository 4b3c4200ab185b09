"""Commands that sample a trained LM: images of every class, outpainting, inpainting. Every sample.* key is a
sampling option (SampleConfig); the options below are short ways to them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import MISSING

from elmgen.commands.base import OUT, POSITIVE, Command, Option, defaults_of, named
from elmgen.config import to_dict
from elmgen.data import DataConfig, pick_images
from elmgen.device import resolve_device
from elmgen.hub import load_generator
from elmgen.plots import image_grid, save_png
from elmgen.sampling import (
    SampleConfig,
    class_balanced,
    image_seeds,
    inpaint_images,
    outpaint_grid,
    outpaint_images,
    rectangle_hole,
    sample_images,
    shard_name,
    share,
    write_samples,
)
from elmgen.schedules import GUIDANCE_SCHEDULES
from elmgen.train.distributed import launched


@dataclass
class LMOptions:
    """What every command that samples from a trained LM reads."""

    model: str = MISSING  # LM run folder or checkpoint, or hf:ORG/NAME (an exported model on the Hugging Face hub)
    tokenizer: str | None = None  # tokenizer run folder or hf:ORG/NAME (default: the one the LM's codes came from)
    ema: bool = True  # use the EMA weights when the checkpoint kept them (false: the trained ones)
    device: str = "auto"  # auto, cpu, cuda[:N] or mps
    out: str = field(default=MISSING, metadata=OUT)  # folder to write
    sample: SampleConfig = field(default_factory=SampleConfig)


SAMPLE_IMAGES = defaults_of(sample_images)


@dataclass
class SampleCommand(LMOptions):
    num_per_class: int = field(default=10, metadata=POSITIVE)  # images of each class (one row each in samples.png)
    classes: list[int] | None = None  # class ids to sample (default: all)
    batch_size: int = field(default=SAMPLE_IMAGES["batch_size"], metadata=POSITIVE)  # images per generation call


def load_lm(cmd: LMOptions):
    """The LM of `model`, its tokenizer (`tokenizer`, or the one its codes came from), checked to match, and the
    sampling options checked against the model, before any work."""
    model, _, tokenizer, tok_meta = load_generator(cmd.model, cmd.tokenizer, resolve_device(cmd.device), cmd.ema)
    cmd.sample.validate(model.vocab_size)
    if cmd.sample.precision == "bf16":  # the model serves only this command: drop its fp32 copy of the weights
        model.bf16_linears()
    return model, tokenizer, tok_meta


def class_labels(cmd, num_classes: int):
    """Labels and per-image seeds of `classes` x `num_per_class` (all classes by default)."""
    classes = cmd.classes if cmd.classes is not None else list(range(num_classes))
    labels, index_in_class = class_balanced(classes, cmd.num_per_class, num_classes)
    return labels, image_seeds(cmd.sample.seed, labels, index_in_class)


def sample_command(cmd: SampleCommand) -> None:
    rank, world = launched()  # under torchrun each process samples its share of the images
    model, tokenizer, _ = load_lm(cmd)
    labels, seeds = class_labels(cmd, model.cfg.num_classes)
    # Seeds are per image, so the shares in rank order are a one-process run's images
    part = share(len(labels), rank, world)
    labels, seeds = labels[part], seeds[part]
    images = sample_images(model, tokenizer, labels, seeds, cmd.sample, batch_size=cmd.batch_size)
    name = shard_name("samples", rank, world)
    png, npz = write_samples(images, labels, seeds, cmd.out, ncols=cmd.num_per_class, name=name)
    print(json.dumps({"png": str(png), "npz": str(npz), "images": len(labels), **to_dict(cmd.sample)}))


@dataclass
class OutpaintCommand(LMOptions):
    height: int | None = field(default=None, metadata=POSITIVE)  # grid cells high (default: the trained grid)
    width: int | None = field(default=None, metadata=POSITIVE)  # grid cells wide (default: twice the trained grid)
    stride: int | None = field(default=None, metadata=POSITIVE)  # cells the window moves (default: half the grid)
    num_per_class: int = field(default=4, metadata=POSITIVE)  # images of each class
    classes: list[int] | None = None  # class ids to sample (default: all)


def outpaint_command(cmd: OutpaintCommand) -> None:
    model, tokenizer, _ = load_lm(cmd)
    height, width, stride = outpaint_grid(model.cfg.grid_size, cmd.height, cmd.width, cmd.stride)
    labels, seeds = class_labels(cmd, model.cfg.num_classes)
    images = outpaint_images(model, tokenizer, labels, seeds, cmd.sample, height, width, stride)
    png, npz = write_samples(images, labels, seeds, cmd.out, ncols=cmd.num_per_class, name="outpaint")
    print(
        json.dumps(
            {
                "png": str(png),
                "npz": str(npz),
                "images": len(labels),
                "grid": [height, width],
                "image_size": list(images.shape[-2:]),
            }
        )
    )


@dataclass
class InpaintCommand(LMOptions):
    region: list[int] = MISSING  # TOP LEFT HEIGHT WIDTH: the rectangle of grid cells to regenerate
    data: str | None = None  # image source (default: the tokenizer's training data)
    split: str = "test"  # train or test
    indices: list[int] = field(default_factory=lambda: [0, 1, 2, 3])  # images of the split to edit


def inpaint_command(cmd: InpaintCommand) -> None:
    model, tokenizer, tok_meta = load_lm(cmd)
    images, labels = pick_images(
        DataConfig(
            source=cmd.data or tok_meta["data"]["source"],
            split=cmd.split,
            image_size=tok_meta["image_size"],
            channels=tok_meta["channels"],
        ),
        list(cmd.indices),
    )
    seeds = image_seeds(cmd.sample.seed, labels, torch.arange(len(labels)))
    result, blanked = inpaint_images(
        model, tokenizer, images, labels, rectangle_hole(tuple(cmd.region), model.cfg.grid_size), cmd.sample, seeds
    )
    out = Path(cmd.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = torch.stack([images, blanked, result], 1).flatten(0, 1)  # per image: original, input, result
    save_png(image_grid(rows, ncols=3, scale=2), out / "inpaint.png")
    print(json.dumps({"png": str(out / "inpaint.png"), "images": len(labels), "region": cmd.region}))


SAMPLING_OPTIONS = (
    # --cfg-*: the options' names before guidance was renamed, still accepted
    Option(("--guidance-scale", "--cfg-scale"), "sample.guidance_scale"),
    Option(("--guidance-schedule", "--cfg-schedule"), "sample.guidance_schedule", choices=GUIDANCE_SCHEDULES),
    Option(("--guidance-power", "--cfg-power"), "sample.guidance_power"),
    Option(("--guidance-interval", "--cfg-interval"), "sample.guidance_interval", nargs=2, metavar=("LO", "HI")),
    Option(("--temperature",), "sample.temperature"),
    Option(("--temperature-end",), "sample.temperature_end"),
    Option(("--top-k",), "sample.top_k"),
    Option(("--top-p",), "sample.top_p"),
    Option(("--seed",), "sample.seed", min=0),
    Option(("--no-kv-cache",), "sample.kv_cache", const=False),
    Option(("--compile",), "sample.compile", const=True),
    Option(("--steps",), "sample.steps"),
    Option(("--mask-noise",), "sample.mask_noise"),
    Option(("--precision",), "sample.precision", choices=("fp32", "bf16")),
)


CLASS_OPTIONS = (Option(("--num-per-class", "-n"), "num_per_class"), Option(("--classes",), "classes", nargs="+"))
LM_OPTIONS = (*named("model", "tokenizer", "device", "out"), Option(("--no-ema",), "ema", const=False))


COMMANDS = (
    Command(
        "sample",
        SampleCommand,
        sample_command,
        "generate class-conditional images",
        "Sample images (AR: KV-cached decoding; MLM: MaskGIT) with classifier-free guidance; writes samples.npz "
        "(ADM layout) and samples.png (one row per class; at most 32 rows of 16). Under torchrun each process "
        "writes its share, samples.rank<R>-of-<W>.npz/.png, which 'elmgen eval' reads as one. Every sample.* key "
        "is a sampling option.",
        (
            *LM_OPTIONS,
            *CLASS_OPTIONS,
            *named("batch_size"),
            *SAMPLING_OPTIONS,
        ),
    ),
    Command(
        "outpaint",
        OutpaintCommand,
        outpaint_command,
        "generate images larger than the trained grid with an AR model",
        "Class-conditional outpainting: a trained-size window slides over a larger grid of cells (--stride cells "
        "at a time, raster order), the AR model sampling each new cell given the cells already generated in its "
        "window; writes outpaint.png (one row per class) and outpaint.npz.",
        (
            *LM_OPTIONS,
            *named("height", "width", "stride"),
            *CLASS_OPTIONS,
            *SAMPLING_OPTIONS,
        ),
    ),
    Command(
        "inpaint",
        InpaintCommand,
        inpaint_command,
        "regenerate a region of real images with a masked model",
        "Encode real images, mask a rectangle of grid cells and fill it with MaskGIT decoding (the other cells "
        "are kept exactly); writes inpaint.png with the original, the masked input and the result per row.",
        (
            *LM_OPTIONS,
            *named("data", "split"),
            Option(("--indices",), "indices", nargs="+"),
            Option(("--region",), "region", nargs=4, metavar=("TOP", "LEFT", "HEIGHT", "WIDTH")),
            *SAMPLING_OPTIONS,
        ),
    ),
)

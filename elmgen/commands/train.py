"""Commands that train: the tokenizer, the language model, the classifier. Each extends its job's dataclass, so
a job's YAML file (configs/) is the command's config file; job.yaml keeps the job alone."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from omegaconf import MISSING

from elmgen.codes import CodeDataset
from elmgen.commands.base import OUT, Command, Option, job_of, named
from elmgen.commands.tokens import print_report
from elmgen.device import PRECISIONS
from elmgen.models import preset
from elmgen.train import ClassifierJob, LMJob, TokenizerJob, train_classifier, train_lm, train_tokenizer
from elmgen.train.config import LOGS
from elmgen.train.distributed import is_main_process

TRAIN_OPTIONS = (
    Option(("--resume",), "resume", const=True),
    Option(("--precision",), "train.precision", choices=PRECISIONS),
    Option(("--compile",), "train.compile", const=True),
    Option(("--grad-accum",), "train.grad_accum", min=1, metavar="N"),
    Option(("--ema-decay",), "train.ema_decay", metavar="D"),
    Option(("--fsdp",), "train.fsdp", const=True),
    Option(("--activation-checkpointing",), "train.activation_checkpointing", const=True),
    Option(("--log",), "train.log", choices=LOGS),
)
WORKERS = Option(("--workers",), "train.workers", min=0, metavar="N")  # for the trainers that decode images


@dataclass
class TrainTokenizerCommand(TokenizerJob):
    out: str = field(default=MISSING, metadata=OUT)  # run folder to write
    resume: bool = False  # continue the run in `out` from its last checkpoint


def train_tokenizer_command(cmd: TrainTokenizerCommand) -> None:
    report = train_tokenizer(job_of(cmd, TokenizerJob), cmd.out, resume=cmd.resume)
    if report:  # under torchrun only the main process reports
        print_report(report)


@dataclass
class TrainLMCommand(LMJob):
    codes: str = MISSING  # code folder written by 'elmgen tokenize'
    out: str = field(default=MISSING, metadata=OUT)  # run folder to write
    preset: str = "tiny"  # model size (models.PRESETS): micro, tiny, small, B, L, XL, XXL, 2B; model.* keys override it
    resume: bool = False  # continue the run in `out` from its last checkpoint


def lm_base(cmd: TrainLMCommand) -> dict:
    """The preset's sizes and the code folder's vocabulary, grid and classes, below the config file."""
    meta = CodeDataset(cmd.codes).meta
    size = {**preset(cmd.preset), "vocab": meta["vocab"], "grid_size": meta["grid"], "num_classes": meta["num_classes"]}
    return {"model": size}


def train_lm_command(cmd: TrainLMCommand) -> None:
    rows = train_lm(job_of(cmd, LMJob), cmd.codes, cmd.out, resume=cmd.resume)
    if rows and is_main_process():
        print(json.dumps(rows[-1]))


@dataclass
class TrainClassifierCommand(ClassifierJob):
    out: str = field(default=MISSING, metadata=OUT)  # run folder to write
    resume: bool = False  # continue the run in `out` from its last checkpoint


def train_classifier_command(cmd: TrainClassifierCommand) -> None:
    print(json.dumps(train_classifier(job_of(cmd, ClassifierJob), cmd.out, resume=cmd.resume), indent=2))


COMMANDS = (
    Command(
        "train-tokenizer",
        TrainTokenizerCommand,
        train_tokenizer_command,
        "train a tokenizer (BAE, VQ or FSQ) on images",
        "Train a tokenizer (tokenizer.quantizer=bae|vq|fsq); writes checkpoints (with EMA weights), metrics.jsonl, "
        "loss.png, eval.json (PSNR, SSIM, code usage) and reconstructions.png. Config files: configs/tokenizer-*.yaml.",
        (
            *named("out"),
            Option(("--data",), "data.source"),
            Option(("--gan",), "loss.gan", const=True),
            Option(("--perceptual-weights",), "loss.perceptual_weights", metavar="FILE"),
            WORKERS,
            *TRAIN_OPTIONS,
        ),
    ),
    Command(
        "train",
        TrainLMCommand,
        train_lm_command,
        "train the AR or masked transformer on a code folder",
        "Train a class-conditional AR or MLM transformer on pre-tokenized codes; writes checkpoints (safetensors "
        "+ JSON), metrics.jsonl and loss.png. The model's size comes from --preset, its vocabulary, grid and "
        "classes from the code folder; a config file (configs/lm-*.yaml) or model.* keys override them.",
        (
            *named("codes", "out", "preset"),
            Option(("--kind",), "model.kind", choices=("ar", "mlm")),
            Option(("--vocab",), "model.vocab"),
            *TRAIN_OPTIONS,
        ),
        base=lm_base,
    ),
    Command(
        "train-classifier",
        TrainClassifierCommand,
        train_classifier_command,
        "train the classifier that measures samples offline",
        "Train a small CNN classifier (the offline feature space of 'elmgen eval' and the judge of class "
        "accuracy); writes checkpoints, metrics.jsonl, job.yaml and eval.json (test accuracy, per-class accuracy, "
        "training time, weights fingerprint).",
        (*named("out"), Option(("--data",), "data.source"), WORKERS, *TRAIN_OPTIONS),
    ),
)

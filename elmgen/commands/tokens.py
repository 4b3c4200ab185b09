"""Commands on tokenizers and codes: a tokenizer's report on held-out images, and a data set encoded once."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING

from elmgen.codes import tokenize
from elmgen.commands.base import NON_NEGATIVE, OUT, POSITIVE, Command, Option, defaults_of, named
from elmgen.data import DataConfig, crop_source_size, load_dataset
from elmgen.data.transforms import CROPS
from elmgen.device import resolve_device
from elmgen.evaluation import tokenizer_report
from elmgen.tokenizers import load_tokenizer
from elmgen.train.distributed import distributed
from elmgen.vocab import Vocab


def print_report(report: dict) -> None:
    """A tokenizer report without its per-bit lists (they stay in eval.json)."""
    print(json.dumps({k: v for k, v in report.items() if k not in ("bit_mean", "bit_entropies")}, indent=2))


@dataclass
class EvalTokenizerCommand:
    tokenizer: str = MISSING  # tokenizer run folder or checkpoint
    out: str = field(default=MISSING, metadata=OUT)  # folder for eval.json and reconstructions.png
    data: str | None = None  # data source (default: the one the tokenizer was trained on)
    split: str = "test"  # train or test
    limit: int | None = field(default=None, metadata=POSITIVE)  # evaluate only the first N images
    vocab: str | None = None  # sub-code split N-C for the usage figures (default: 2-K/2 for BAE, 1-K else)
    device: str = "auto"  # auto, cpu, cuda[:N] or mps


def eval_tokenizer_command(cmd: EvalTokenizerCommand) -> None:
    tokenizer, meta = load_tokenizer(cmd.tokenizer, resolve_device(cmd.device))
    data = DataConfig(
        source=cmd.data or meta["data"]["source"],
        split=cmd.split,
        image_size=meta["image_size"],
        channels=meta["channels"],
        limit=cmd.limit,
    )
    out = Path(cmd.out)
    out.mkdir(parents=True, exist_ok=True)
    report = tokenizer_report(tokenizer, load_dataset(data), out, Vocab.parse(cmd.vocab) if cmd.vocab else None)
    print_report({**report, "tokenizer": meta["path"]})


TOKENIZE = defaults_of(tokenize)


@dataclass
class TokenizeCommand:
    tokenizer: str = MISSING  # tokenizer run folder or checkpoint
    out: str = field(default=MISSING, metadata=OUT)  # code folder to write (re-run to resume)
    data: str | None = None  # data source (default: the one the tokenizer was trained on)
    split: str = "train"  # train or test
    vocab: str | None = None  # default vocabulary split N-C with N*C = K (default: 2-K/2 for BAE, 1-K else)
    flip: bool = TOKENIZE["flip"]  # also store codes of horizontally flipped images
    crops: str = TOKENIZE["crops"]  # none; five: four corners + centre (with flip: LlamaGen's ten-crop); random;
    # shift: translated by up to (crop_range - 1) / 2 of the side each way, edge pixels repeated, nothing resampled
    num_crops: int = field(default=TOKENIZE["num_crops"], metadata=POSITIVE)  # random or shift crops per image
    crop_range: float = TOKENIZE["crop_range"]  # crops are cut from images enlarged by this factor (LlamaGen: 1.1)
    draws: int = field(default=TOKENIZE["draws"], metadata=NON_NEGATIVE)  # BAE: N Bernoulli draws a view (0: none)
    seed: int = field(default=TOKENIZE["seed"], metadata=NON_NEGATIVE)  # seed of random crops and draws
    limit: int | None = field(default=None, metadata=POSITIVE)  # encode only the first N images
    batch_size: int = field(default=TOKENIZE["batch_size"], metadata=POSITIVE)  # images per encoder call
    shard_size: int = field(default=TOKENIZE["shard_size"], metadata=POSITIVE)  # images a shard (the unit of resuming)
    workers: int | None = field(default=None, metadata=NON_NEGATIVE)  # processes decoding images (default: none for
    # Fashion-MNIST, held in memory; one per core but one for a folder); the codes are the same with any number
    device: str = "auto"  # auto (under torchrun: the process's GPU), cpu, cuda[:N] or mps


def tokenize_command(cmd: TokenizeCommand) -> None:
    rank, world = distributed()  # under torchrun every process encodes its share of the shards
    tokenizer, meta = load_tokenizer(cmd.tokenizer, resolve_device(cmd.device))
    data = DataConfig(
        source=cmd.data or meta["data"]["source"],
        split=cmd.split,
        channels=meta["channels"],
        image_size=crop_source_size(meta["image_size"], cmd.crop_range, cmd.crops),
        limit=cmd.limit,
    )
    vocab = Vocab.parse(cmd.vocab) if cmd.vocab else tokenizer.default_vocab
    options = ("flip", "crops", "num_crops", "crop_range", "draws", "seed", "batch_size", "shard_size")
    settings = {k: getattr(cmd, k) for k in options}
    out = tokenize(
        tokenizer, meta, load_dataset(data), cmd.out, vocab, rank=rank, world=world, workers=cmd.workers, **settings
    )
    if rank == 0:
        print(json.dumps({k: v for k, v in out.items() if k != "shards"}, indent=2))


COMMANDS = (
    Command(
        "eval-tokenizer",
        EvalTokenizerCommand,
        eval_tokenizer_command,
        "reconstruction quality and code usage of a tokenizer",
        "PSNR, SSIM, code usage (of the code space, of each sub-code vocabulary, per bit) and codebook perplexity "
        "on held-out images; writes eval.json and reconstructions.png to --out and prints the JSON.",
        named("tokenizer", "out", "data", "split", "limit", "vocab", "device"),
    ),
    Command(
        "tokenize",
        TokenizeCommand,
        tokenize_command,
        "encode a dataset into a code folder once",
        "Encode images (and augmented views) with a trained tokenizer into sharded, memory-mapped code files + "
        "labels.npy + meta.json. LM training reads these and never runs the encoder. An interrupted run resumes "
        "when re-run. Under torchrun the processes share the shards and write the folder one process writes.",
        (
            *named("tokenizer", "out", "data", "split", "vocab"),
            Option(("--flip",), "flip", const=True),
            Option(("--crops",), "crops", choices=CROPS),
            *named(
                "num_crops", "crop_range", "draws", "seed", "limit", "batch_size", "shard_size", "workers", "device"
            ),
        ),
    ),
)

"""Commands that measure: samples against a reference (FID, IS, precision/recall, class accuracy), reference
statistics, and the paper's analyses (`elmgen analyze ...`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING

from elmgen.analysis import (
    AttentionConfig,
    BitsConfig,
    SubcodesConfig,
    analyze_attention,
    analyze_bits,
    analyze_loss,
    analyze_randomness,
    analyze_subcodes,
    randomness_markdown,
)
from elmgen.commands.base import NON_NEGATIVE, OUT, POSITIVE, Command, Option, defaults_of, job_of, named
from elmgen.data import DataConfig
from elmgen.device import resolve_device
from elmgen.errors import ElmgenError
from elmgen.evaluation import evaluate_samples, is_stats_file, load_extractor, open_reference, save_ref_stats
from elmgen.io import atomic_write_text

EVALUATE = defaults_of(evaluate_samples)


@dataclass
class FeatureOptions:
    """The feature space and reference that `eval` and `ref-stats` read."""

    ref: str = MISSING  # 'fashion-mnist', a class folder, an .npz of images (arr_0 uint8 NHWC) or (eval) of statistics
    split: str = "train"  # split of a reference data set
    limit: int | None = field(default=None, metadata=POSITIVE)  # use only the first N images of a reference data set
    backend: str = "classifier"  # classifier (a run of 'elmgen train-classifier', offline) or inception (FID Inception)
    classifier: str | None = None  # classifier run folder or checkpoint, for the classifier backend
    inception_weights: str | None = None  # FID Inception weights file (default: $ELMGEN_INCEPTION_WEIGHTS)
    k: int = field(default=EVALUATE["k"], metadata=POSITIVE)  # neighbourhood size of the precision/recall manifolds
    batch_size: int = field(default=EVALUATE["batch_size"], metadata=POSITIVE)  # images per extractor call
    workers: int | None = field(default=None, metadata=NON_NEGATIVE)  # processes decoding a reference folder (default:
    # one per core but one; none for Fashion-MNIST, held in memory)
    device: str = "auto"  # auto, cpu, cuda[:N] or mps


def extractor_and_reference(cmd: FeatureOptions):
    extractor = load_extractor(cmd.backend, cmd.classifier, cmd.inception_weights, resolve_device(cmd.device))
    ref = cmd.ref if cmd.ref.endswith(".npz") else DataConfig(source=cmd.ref, split=cmd.split, limit=cmd.limit)
    return extractor, ref


@dataclass
class EvalCommand(FeatureOptions):
    samples: list[str] = MISSING  # .npz files (ADM layout; shards are read together), a folder of them, or of images
    splits: int = field(default=EVALUATE["splits"], metadata=POSITIVE)  # splits of the Inception Score
    out: str | None = field(default=None, metadata={"path": "file"})  # also write the JSON to this file


def eval_command(cmd: EvalCommand) -> None:
    extractor, ref = extractor_and_reference(cmd)
    text = json.dumps(
        evaluate_samples(cmd.samples, ref, extractor, cmd.k, cmd.splits, cmd.batch_size, workers=cmd.workers), indent=2
    )
    if cmd.out:
        Path(cmd.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(cmd.out), text + "\n")
    print(text)


@dataclass
class RefStatsCommand(FeatureOptions):
    out: str = field(default=MISSING, metadata={"path": "file"})  # .npz file to write


def ref_stats_command(cmd: RefStatsCommand) -> None:
    if is_stats_file(cmd.ref):
        raise ElmgenError(f"{cmd.ref} already holds statistics; pass images or a data set as --ref")
    extractor, ref = extractor_and_reference(cmd)
    stats = open_reference(ref, extractor, cmd.batch_size, cmd.k, cmd.workers)
    path = save_ref_stats(stats, cmd.out)
    print(
        json.dumps(
            {
                "out": str(path),
                "count": stats.count,
                "source": stats.source,
                "k": stats.k,
                "feature_space": stats.feature_space,
            },
            indent=2,
        )
    )


RANDOMNESS = defaults_of(analyze_randomness)


@dataclass
class RandomnessCommand:
    out: str = field(default=MISSING, metadata=OUT)  # folder to write
    codes: list[str] = field(default_factory=list)  # code folders written by 'elmgen tokenize'
    text: list[str] = field(default_factory=list)  # text files, read as one corpus (e.g. /usr/share/games/fortunes/*)
    bpe_vocab: int = RANDOMNESS["bpe_vocab"]  # BPE vocabulary size trained on the text
    limit: int | None = field(default=None, metadata=POSITIVE)  # use only the first N rows of each code folder


def randomness_command(cmd: RandomnessCommand) -> None:
    rows = analyze_randomness(cmd.out, cmd.codes, cmd.text, cmd.bpe_vocab, cmd.limit)
    print(randomness_markdown(rows))
    print(f"wrote {cmd.out}/randomness.json, randomness.md and randomness.png")


@dataclass
class AttentionCommand(AttentionConfig):
    models: list[str] = MISSING  # LM run folders or checkpoints
    out: str = field(default=MISSING, metadata=OUT)  # folder to write


def attention_command(cmd: AttentionCommand) -> None:
    cfg = job_of(cmd, AttentionConfig)
    result = analyze_attention(cmd.models, cmd.out, cfg)
    keys = ("mean_distance", f"within_r{cfg.radii[0]}", "global_share", "context_share", "sink_share")
    for name, rep in result["models"].items():
        uniform = ", ".join(f"{k} {rep['uniform'][k]:.3f}" for k in keys)
        print(f"{name} ({rep['params']:,} params; uniform attention: {uniform})")
        for layer in rep["layers"]:
            print(f"  layer {layer['layer']}: " + ", ".join(f"{k} {layer[k]:.3f}" for k in keys))
    print(f"wrote {cmd.out}/attention.json, attention-depth.png and a heat-map PNG per model")


@dataclass
class LossCommand:
    runs: list[str] = MISSING  # LM run folders
    out: str = field(default=MISSING, metadata=OUT)  # folder to write


def loss_command(cmd: LossCommand) -> None:
    for name, r in analyze_loss(cmd.runs, cmd.out).items():
        keys = ("vocab", "params", "final_step", "final_loss", "ln_vocab", "final_loss_norm")
        print(json.dumps({"run": name, **{k: r[k] for k in keys}}))
    print(f"wrote {cmd.out}/loss.json and loss.png")


@dataclass
class BitsCommand(BitsConfig):
    tokenizer: str = MISSING  # binary (bae) tokenizer run folder or checkpoint
    model: str | None = None  # LM run folder or checkpoint trained on this tokenizer's codes: adds its loss per bit
    out: str = field(default=MISSING, metadata=OUT)  # folder to write


def bits_command(cmd: BitsCommand) -> None:
    r = analyze_bits(cmd.tokenizer, cmd.out, job_of(cmd, BitsConfig), cmd.model)
    for k in range(r["bits"]):
        lm = f", LM {r['lm_nats'][k]:.4f} nats" if "lm_nats" in r else ""
        print(f"bit {k}: PSNR drop {r['psnr_drop'][k]:.3f} dB, MSE +{r['mse_increase'][k]:.5f}{lm}")
    print(f"wrote {cmd.out}/bits.json and bits.png")


@dataclass
class SubcodesCommand(SubcodesConfig):
    models: list[str] = MISSING  # LM run folders or checkpoints with two or more sub-codes a cell
    out: str = field(default=MISSING, metadata=OUT)  # folder to write


def subcodes_command(cmd: SubcodesCommand) -> None:
    result = analyze_subcodes(cmd.models, cmd.out, job_of(cmd, SubcodesConfig))
    for name, r in result["models"].items():
        print(
            f"{name} ({r['kind']} {r['vocab']}): factorized {r['factorized_nats']:.4f}, joint {r['joint_nats']:.4f}, "
            f"gap {r['gap_nats']:.4f} nats/cell (95% CI {r['gap_low']:.4f} to {r['gap_high']:.4f}); "
            f"the model's heads {r['model_nats']:.4f}"
        )
    print(f"wrote {cmd.out}/subcodes.json and subcodes.png")


FEATURE_OPTIONS = (
    *named("ref", "split", "limit", "classifier", "inception_weights", "k", "batch_size", "workers", "device", "out"),
    Option(("--backend",), "backend", choices=("classifier", "inception")),
)


COMMANDS = (
    Command(
        "eval",
        EvalCommand,
        eval_command,
        "FID, IS, precision/recall and class accuracy of samples",
        "Measure samples against a reference in a named feature space: FID, Inception Score, precision/recall "
        "(k-NN manifolds) and, for labelled samples and the classifier backend, class accuracy. Prints JSON that "
        "names the feature extractor, its fingerprint and the sample and reference counts.",
        (Option(("--samples",), "samples", nargs="+"), *FEATURE_OPTIONS, *named("splits")),
    ),
    Command(
        "ref-stats",
        RefStatsCommand,
        ref_stats_command,
        "reference statistics for FID and precision/recall, computed once",
        "Compute the reference's feature mean and covariance (pytorch-fid fields mu, sigma) plus its features and "
        "k-NN radii for precision/recall; pass the file to 'elmgen eval --ref'.",
        FEATURE_OPTIONS,
    ),
    Command(
        "analyze randomness",
        RandomnessCommand,
        randomness_command,
        "how random image tokens are, next to text",
        "Unigram and raster-neighbour statistics (KL from uniform, entropy, entropy given the left/upper "
        "neighbours, vocabulary usage) of code folders (each sub-code and the whole cell code) and of a text corpus "
        "as bytes and as BPE tokens; writes randomness.json, .md and .png.",
        (
            *named("out", "bpe_vocab", "limit"),
            Option(("--codes",), "codes", nargs="+"),
            Option(("--text",), "text", nargs="+"),
        ),
    ),
    Command(
        "analyze attention",
        AttentionCommand,
        attention_command,
        "where a model's attention looks, per layer and head",
        "Attention probabilities of each layer and head, averaged over real or sampled sequences: mean attention "
        "distance (grid cells), share within radius 1 and 2, share on the class token, share beyond a global "
        "radius, and that far share split into a sink (positions every query can attend to whatever they hold: "
        "the class token and the first cell, --sink) and long-range context (context_share). Writes "
        "attention.json, attention-depth.png (all models) and attention-<model>.png (heat-maps of "
        "query cells per layer).",
        (
            Option(("--model",), "models", nargs="+"),
            *named("out", "codes", "num_sequences", "global_radius", "mask_ratio", "batch_size"),
            Option(("--sampled",), "sampled", const=True),
            Option(("--query",), "queries", nargs=2, metavar=("ROW", "COL"), action="append"),
            Option(("--seed",), "seed", min=0),
            Option(("--sink",), "sink_positions", nargs="+", metavar="POS", min=0),
        ),
    ),
    Command(
        "analyze loss",
        LossCommand,
        loss_command,
        "training-loss curves of several runs, normalised by ln(vocabulary)",
        "Loss / ln V over training for each LM run (V: one sub-code vocabulary, so 1 is a uniform guess) and the "
        "final loss against parameters; writes loss.json and loss.png.",
        (Option(("runs",), "runs", nargs="+", metavar="RUN"), *named("out")),
    ),
    Command(
        "analyze bits",
        BitsCommand,
        bits_command,
        "what each bit of a binary tokenizer's code costs when flipped, and the LM's loss on it",
        "Per bit of the cell code (0: most significant): the mean MSE increase and PSNR drop of held-out "
        "reconstructions when the bit is flipped in a share of the cells, and with --model the LM's "
        "teacher-forced cross-entropy on it (nats/bit, its sub-code softmax marginalised onto the bit); writes "
        "bits.json and bits.png.",
        (
            *named("tokenizer", "model", "data", "split", "share", "batch_size", "out"),
            Option(("--limit",), "limit", min=1),
            Option(("--seed",), "seed", min=0),
        ),
    ),
    Command(
        "analyze subcodes",
        SubcodesCommand,
        subcodes_command,
        "what the factorized vocabulary gives up: the sub-codes' dependence given the hidden state",
        "The conditional total correlation of the sub-codes of a cell given the model's hidden state (the mutual "
        "information I(s1; s2 | h) for two sub-codes), which independent sub-code heads cannot express: the gap "
        "between a factorized and a joint probe fitted on the frozen model's hidden states, scored on held-out "
        "sequences, with a 95% paired bootstrap interval. Writes subcodes.json and subcodes.png.",
        (
            Option(("--model",), "models", nargs="+"),
            *named("out", "codes", "num_sequences", "held_out", "mask_ratio", "width", "steps", "batch_size", "lr"),
            Option(("--seed",), "seed", min=0),
        ),
    ),
)


ANALYZE_HELP = (
    "the paper's analyses: token randomness, attention, loss curves, bit importance, sub-code dependence "
    "(see docs/analysis.md)"
)

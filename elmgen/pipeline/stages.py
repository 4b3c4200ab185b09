"""The ELM pipeline as resumable stages: tokenizer -> code folder -> language model -> samples.

A stage whose output is complete is skipped, so a killed run continues where it stopped, and
runs that share a stage (the same tokenizer config, the same tokenizer + LM config) can share its
folder: `shared_dirs` names each stage folder by a hash of exactly the config that determines it.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field, is_dataclass, replace
from pathlib import Path

from elmgen import checkpoint
from elmgen.codes import CodeDataset, tokenize
from elmgen.config import save_yaml, to_dict
from elmgen.data import inspect_folder, load_dataset
from elmgen.errors import ElmgenError
from elmgen.evaluation import Reconstructions, evaluate_samples, load_extractor, open_reference, save_ref_stats
from elmgen.io import atomic_write_text, read_metrics, remove_temporaries
from elmgen.models import ModelConfig, count_params, load_model, preset
from elmgen.sampling import SampleConfig, class_balanced, image_seeds, sample_images, write_samples
from elmgen.tokenizers import TokenizerConfig, load_tokenizer
from elmgen.train import ClassifierJob, LMJob, TokenizerJob, TrainConfig, train_classifier, train_lm, train_tokenizer
from elmgen.vocab import Vocab

# Shifted views move an image by up to 1/16 of its side each way (2 px at 32 px): `tokenize`'s shift crops at this range
SHIFT_RANGE = 1.125


@dataclass
class Views:
    """The codings of each training image the language model learns from (`elmgen tokenize --flip --crops shift
    --draws`)."""

    flip: bool = False  # also its mirror image
    shifts: int = 0  # > 0: this many copies of the image moved by up to 1/16 of its side each way, not the image
    draws: int = 0  # > 0: this many Bernoulli draws of each view's code (BAE) instead of its deterministic code

    def tokenize_settings(self) -> dict:
        """These views as `tokenize`'s arguments."""
        shifted = dict(crops="shift", num_crops=self.shifts, crop_range=SHIFT_RANGE) if self.shifts else {}
        return dict(flip=self.flip, draws=self.draws, **shifted)

    def validate(self, quantizer: str) -> None:
        if self.shifts < 0:
            raise ElmgenError(f"views.shifts={self.shifts}: shifted copies are a number >= 0 (0: the image itself)")
        if self.draws < 0 or (self.draws and quantizer != "bae"):
            raise ElmgenError(
                f"views.draws={self.draws}: Bernoulli draws are a number >= 0, and > 0 only with the binary "
                f"autoencoder (this run's tokenizer: {quantizer}); use views.draws=0 (views.shifts makes more "
                "codings of each image with any tokenizer)"
            )


@dataclass
class PipelineConfig:
    """One full run. The defaults are the Fashion-MNIST demo (its time: README, docs/performance.md)."""

    tokenizer: TokenizerJob = field(
        default_factory=lambda: TokenizerJob(
            tokenizer=TokenizerConfig(base_width=32, channel_mult=[1, 2, 2], num_res_blocks=1, num_bits=16),
            train=TrainConfig(
                steps=800,
                batch_size=64,
                lr=2e-3,
                warmup_steps=100,
                lr_decay="cosine",
                weight_decay=0.0,
                precision="auto",
                save_every=300,
                ema_decay=0.999,
            ),
        )
    )
    lm: LMJob = field(
        default_factory=lambda: LMJob(
            model=ModelConfig(**preset("tiny"), vocab="2-8", grid_size=0, num_classes=0),  # 0: from the code folder
            train=TrainConfig(
                steps=600,
                batch_size=128,
                lr=2e-3,
                warmup_steps=100,
                lr_decay="cosine",
                min_lr=1e-4,
                precision="auto",
                save_every=100,
            ),
        )
    )
    views: Views = field(default_factory=Views)  # folder runs: mirrored, 4 shifted copies (`FOLDER_VIEWS`)
    sample: SampleConfig = field(default_factory=SampleConfig)
    num_per_class: int = 10  # samples of each class
    evaluate: bool = True  # FID, IS, precision/recall, class accuracy in the feature space of `classifier`
    classifier: ClassifierJob = field(  # the classifier's own recipe, shorter; trained once on the tokenizer's data
        default_factory=lambda: ClassifierJob(train=replace(ClassifierJob().train, steps=1000))
    )
    reference_images: int = 10000  # training images behind the reference statistics
    minutes: float = 0.0  # > 0: the training stages' step counts are chosen to fit this many minutes in all


# The tokenizer's levels at each image side: a downsampling factor that keeps the grid at 8x8 up to 128 px
# (16x16 at 256 px, the paper's), so the LM's cost stays that of the 32 px demo.
RESOLUTION_LEVELS = {32: [1, 2, 2], 64: [1, 2, 2, 2], 128: [1, 1, 2, 2, 4], 256: [1, 1, 2, 2, 4]}

# What a class folder of one's own gets beyond its detected settings (measured: docs/own-data.md). The judge of its
# samples looks at where the outlines are, so the tokenizer weighs the pixels beside an edge 1 + 4 times and binarizes
# deterministically (its reconstructions' precision at 1,250 steps: 0.45, against 0.23 with Bernoulli draws). A folder
# is small (a few thousand images): within a budget the language model would see each image dozens of times and
# memorise it, so it learns from eight codings of each, four shifted copies of the image and of its mirror image.
# Sampling keeps the five likeliest entries of each sub-code, with guidance 5.
FOLDER_VIEWS, FOLDER_EDGE_WEIGHT = {"flip": True, "shifts": 4}, 4.0
FOLDER_SAMPLING = {"guidance_scale": 5.0, "top_k": 5}


def folder_recipe(channels: int, size: int) -> dict:
    """What every pipeline on a class folder gets (`run --data`, a sweep over one): its channels, the tokenizer's
    levels for its image side (when that side has a recipe), deterministic binarization, the edge weight, the views
    and the sampling."""
    tokenizer: dict = {
        "data": {"channels": channels},
        "loss": {"edge_weight": FOLDER_EDGE_WEIGHT},
        "tokenizer": {"binarization": "deterministic"},
    }
    if size in RESOLUTION_LEVELS:
        tokenizer["tokenizer"]["channel_mult"] = RESOLUTION_LEVELS[size]
    return {"tokenizer": tokenizer, "views": dict(FOLDER_VIEWS), "sample": dict(FOLDER_SAMPLING)}


def folder_config(source: str | Path, image_size: int | None = None) -> tuple[dict, str]:
    """Pipeline settings for a class folder (channels and image side detected, or the side given) and a
    line saying what was chosen."""
    channels, detected = inspect_folder(source)
    size = image_size or detected
    if size not in RESOLUTION_LEVELS:
        raise ElmgenError(f"--image-size {size} has no recipe; use one of {', '.join(map(str, RESOLUTION_LEVELS))}")
    grid = size // 2 ** (len(RESOLUTION_LEVELS[size]) - 1)
    recipe = folder_recipe(channels, size)
    recipe["tokenizer"]["data"].update(source=str(Path(source).resolve()), image_size=size)
    note = (
        f"{source}: {'colour' if channels == 3 else 'grey'} images at {size} px "
        f"({'given' if image_size else 'detected'}), a {grid}x{grid} grid of codes"
    )
    return recipe, note


@dataclass
class StageDirs:
    tokenizer: Path
    codes: Path
    lm: Path
    samples: Path
    classifier: Path


# Under a time budget (`minutes`): the tokenizer's share of it, and the share kept back for the classifier and for
# what is not training (tokenizing, sampling, reference statistics, metrics); the language model gets the rest,
# measured when it starts, so it absorbs a stage that ran long.
TOKENIZER_SHARE, CLASSIFIER_SHARE, OVERHEAD_SHARE = 0.30, 0.05, 0.07


def with_budget(job, seconds: float):
    """A job (anything with a `train` TrainConfig) that trains for `seconds` instead of its step count."""
    return replace(job, train=replace(job.train, time_budget_s=max(1.0, seconds)))


def config_hash(*parts) -> str:
    """Short hash of configs (dataclasses) or plain JSON-able values."""
    text = json.dumps([to_dict(p) if is_dataclass(p) else p for p in parts], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def shared_dirs(cfg: PipelineConfig, root: str | Path, samples: str | Path) -> StageDirs:
    """Stage folders under `root` keyed by the configs that determine them (codes do not depend on
    the LM's vocabulary split, so every split shares one code folder)."""
    root = Path(root)
    budget = [cfg.minutes] if cfg.minutes else []  # a budgeted stage differs from one of the configured steps
    views = [cfg.views] if cfg.views != Views() else []  # (the folders of runs made before views existed)
    tok = config_hash(cfg.tokenizer, *budget)
    return StageDirs(
        root / "tokenizers" / tok,
        root / "codes" / config_hash(cfg.tokenizer, *budget, *views),
        root / "lms" / config_hash(cfg.tokenizer, cfg.lm, *budget, *views),
        Path(samples),
        root / "classifiers" / config_hash(classifier_job(cfg), *budget),
    )


def classifier_job(cfg: PipelineConfig) -> ClassifierJob:
    """The evaluation classifier sees the same images as the tokenizer (data set, size, channels)."""
    return replace(cfg.classifier, data=replace(cfg.tokenizer.data, split="train"))


def trained(run_dir: Path, train: TrainConfig) -> bool:
    """Whether a training stage is finished: its latest checkpoint is that of the last step (under a time
    budget, the step count the run chose). Its metrics.jsonl can be complete while a kill interrupted that
    checkpoint. The tokenizer and classifier stages write eval.json after it, so that file says the same for them."""
    if not checkpoint.has_checkpoint(run_dir):
        return False
    config = checkpoint.load_config(run_dir)
    steps = config.get("total_steps", train.steps) if train.time_budget_s else train.steps
    return config.get("step", 0) >= steps


def evaluate_run(cfg: PipelineConfig, dirs: StageDirs, labels, seeds: list[int], tokenizer) -> dict:
    """Train (once) the feature-space classifier and its reference statistics, then score the samples, and the
    tokenizer's reconstructions of the held-out images (the ceiling for the samples)."""
    if not (dirs.classifier / "eval.json").is_file():
        job = classifier_job(cfg)
        job = with_budget(job, CLASSIFIER_SHARE * cfg.minutes * 60) if cfg.minutes else job
        train_classifier(job, dirs.classifier, resume=checkpoint.has_checkpoint(dirs.classifier))
    extractor = load_extractor("classifier", classifier=dirs.classifier)
    ref_file = dirs.classifier / f"reference_{cfg.reference_images}.npz"
    if ref_file.is_file():
        ref = open_reference(ref_file, extractor)  # refuses statistics of another classifier
    else:
        data = replace(cfg.tokenizer.data, split="train", limit=cfg.reference_images)
        ref = open_reference(data, extractor, workers=cfg.classifier.train.workers)
        save_ref_stats(ref, ref_file)
    result = score_samples(dirs.samples, labels, seeds, ref, extractor)
    result["classifier_test_accuracy"] = json.loads((dirs.classifier / "eval.json").read_text())["accuracy"]
    held_out = load_dataset(cfg.tokenizer.held_out)
    ceiling = evaluate_samples(Reconstructions(tokenizer, held_out), ref, extractor, splits=min(10, len(held_out)))
    result["reconstructions"] = {k: ceiling[k] for k in ("num_samples", "fid", "precision", "recall", "class_accuracy")}
    return result


def sample_stage(cfg: PipelineConfig, model, tokenizer, classes: list[int], samples_dir: Path):
    """`num_per_class` samples of each of `classes`, written to samples_dir; their labels and seeds."""
    labels, index_in_class = class_balanced(classes, cfg.num_per_class, model.cfg.num_classes)
    seeds = image_seeds(cfg.sample.seed, labels, index_in_class)
    images = sample_images(model, tokenizer, labels, seeds, cfg.sample)
    write_samples(images, labels, seeds, samples_dir, ncols=cfg.num_per_class)
    return labels, seeds


def score_samples(samples_dir: Path, labels, seeds: list[int], ref, extractor) -> dict:
    """The samples' FID, IS, precision/recall and class accuracy; each sample's scores go to PER_SAMPLE."""
    # the Inception Score needs a sample per split: few classes x few samples get fewer splits
    result = evaluate_samples(samples_dir / "samples.npz", ref, extractor, splits=min(10, len(labels)), per_sample=True)
    per_sample = {"seed": seeds, "label": labels.tolist(), **result.pop("per_sample")}
    atomic_write_text(samples_dir / PER_SAMPLE, json.dumps(per_sample))
    return result


def start_samples(samples_dir: Path) -> None:
    """Clear what a killed run left half-written in its samples folder."""
    if samples_dir.is_dir():
        remove_temporaries(samples_dir, "samples", "metrics.json", "config.yaml", PER_SAMPLE)


def finish_run(cfg: PipelineConfig, samples_dir: Path, metrics: dict) -> dict:
    """The run's config and metrics, written last: a run is done when its metrics.json exists."""
    save_yaml(cfg, samples_dir / "config.yaml")
    atomic_write_text(samples_dir / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def sampling_summary(cfg: PipelineConfig, labels) -> dict:
    return {**to_dict(cfg.sample), "num_per_class": cfg.num_per_class, "images": len(labels)}


def fit_to_codes(job: LMJob, meta: dict) -> LMJob:
    """The LM job with the grid and class count of the code folder where the config leaves them at 0; a
    value the config sets must agree with the data."""
    model = job.model
    for key, data_key, what in (("grid_size", "grid", "a grid of"), ("num_classes", "num_classes", "classes:")):
        value = getattr(model, key)
        if value and value != meta[data_key]:
            raise ElmgenError(
                f"lm.model.{key}={value} is set in the config, but the data gives {what} "
                f"{meta[data_key]} ({meta['dataset']}); drop lm.model.{key} to take it from the data"
            )
    return replace(job, model=replace(model, grid_size=meta["grid"], num_classes=meta["num_classes"]))


def lm_summary(model: ModelConfig, last_row: dict | None = None) -> dict:
    """The LM's part of metrics.json: its shape and, when it trained here, its last logged loss, next to a
    uniform guess's."""
    vocab = model.vocabulary
    summary = {
        "kind": model.kind,
        "layers": model.n_layer,
        "width": model.d_model,
        "vocab": str(vocab),
        "params": count_params(model),
        "uniform_loss": math.log(vocab.size),
    }
    if last_row is not None:
        summary.update(steps=last_row["step"], final_loss=last_row["loss"], tokens_per_s=last_row.get("tok_per_s"))
    return summary


def budget_seconds(cfg: PipelineConfig) -> float:
    """The run's time budget in seconds (0: the configured step counts), checked."""
    if not 0 <= cfg.minutes < math.inf:
        raise ElmgenError(
            f"minutes={cfg.minutes} is out of range: it must be a finite number >= 0 (0: the configured steps)"
        )
    return cfg.minutes * 60


def budget_summary(cfg: PipelineConfig, dirs: StageDirs) -> dict:
    """metrics.json's budget: the minutes and the step count each training stage chose under them."""
    stages = {"tokenizer": dirs.tokenizer, "lm": dirs.lm, "classifier": dirs.classifier if cfg.evaluate else None}
    steps = {name: checkpoint.load_config(d)["step"] for name, d in stages.items() if d is not None}
    return {"minutes": cfg.minutes, "steps": steps}


# Each sample's seed, label and scores (evaluate_samples' per_sample), next to metrics.json: what a sweep pairs runs by.
PER_SAMPLE = "per_sample.json"


def run_pipeline(cfg: PipelineConfig, dirs: StageDirs) -> dict:
    """Run (or finish) every stage; returns the run's metrics, also written to samples/metrics.json."""
    timings: dict[str, float] = {}
    cfg.sample.validate(cfg.lm.model.vocabulary.size)  # now, not after the training stages
    cfg.views.validate(cfg.tokenizer.tokenizer.quantizer)
    cfg.classifier.validate()
    budget_s = budget_seconds(cfg)
    deadline = time.perf_counter() + budget_s  # a resumed run plans its unfinished stages from its own start
    start_samples(dirs.samples)

    t = time.perf_counter()
    if not (dirs.tokenizer / "eval.json").is_file():
        job = with_budget(cfg.tokenizer, TOKENIZER_SHARE * budget_s) if budget_s else cfg.tokenizer
        train_tokenizer(job, dirs.tokenizer, resume=checkpoint.has_checkpoint(dirs.tokenizer))
    tokenizer, tok_meta = load_tokenizer(dirs.tokenizer)
    tok_eval = json.loads((dirs.tokenizer / "eval.json").read_text())
    timings["tokenizer"] = time.perf_counter() - t

    t = time.perf_counter()
    vocab = Vocab.parse(cfg.lm.model.vocab)
    if not (dirs.codes / "meta.json").is_file():
        tokenize(
            tokenizer,
            tok_meta,
            load_dataset(cfg.tokenizer.data),
            dirs.codes,
            vocab,
            workers=cfg.tokenizer.train.workers,
            **cfg.views.tokenize_settings(),
        )
    timings["tokenize"] = time.perf_counter() - t

    t = time.perf_counter()
    lm_job = fit_to_codes(cfg.lm, CodeDataset(dirs.codes).meta)
    if budget_s:
        lm_job = with_budget(lm_job, deadline - time.perf_counter() - (CLASSIFIER_SHARE + OVERHEAD_SHARE) * budget_s)
    if not trained(dirs.lm, lm_job.train):
        train_lm(lm_job, dirs.codes, dirs.lm, resume=checkpoint.has_checkpoint(dirs.lm))
    rows = read_metrics(dirs.lm / "metrics.jsonl")
    model, _ = load_model(dirs.lm)
    timings["lm"] = time.perf_counter() - t

    t = time.perf_counter()
    labels, seeds = sample_stage(cfg, model, tokenizer, list(range(len(tok_meta["class_names"]))), dirs.samples)
    timings["sample"] = time.perf_counter() - t

    evaluation = None
    if cfg.evaluate:
        t = time.perf_counter()
        evaluation = evaluate_run(cfg, dirs, labels, seeds, tokenizer)
        timings["evaluate"] = time.perf_counter() - t

    metrics = {
        "tokenizer": {k: v for k, v in tok_eval.items() if k != "bit_mean"},
        "lm": {**lm_summary(lm_job.model, rows[-1]), "views": to_dict(cfg.views)},
        "sampling": sampling_summary(cfg, labels),
        "eval": evaluation,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "dirs": {k: str(v) for k, v in vars(dirs).items()},
    }
    if cfg.minutes:
        metrics["budget"] = budget_summary(cfg, dirs)
    return finish_run(cfg, dirs.samples, metrics)

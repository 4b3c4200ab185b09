"""Design-space sweeps: a grid (and/or list) of pipeline runs that share whatever stages they can.

Each run is the base PipelineConfig with some dotted fields overridden. Stage folders are keyed by
the configs that determine them, so runs differing only in sampling share one model, runs differing
only in the LM share one tokenizer and code folder. A run whose metrics.json exists is skipped:
re-running a finished sweep does no work, and a killed sweep completes only what is missing.

With `replicates: N` every setting runs N times: replicate r adds r to the seeds of the stages named by
`reseed` (default: sampling, plus each trained stage a swept field changes), so a replicate of a
sampling-only sweep reuses the trained models. Replicate r of every setting has the same seeds, so two
settings are compared pair by pair: per image where the metric is a mean over images (the same seed
draws the same image's randomness), else per replicate. The summary gives each setting's mean and 95%
interval over its replicates and marks the settings that differ significantly from the column's best.

With `model.path` the sweep trains nothing: every run samples that model (an imported release, a run trained
elsewhere) and scores its samples against `model.reference`.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import time
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from elmgen.device import resolve_device
from elmgen.errors import ElmgenError
from elmgen.evaluation import load_extractor, open_reference
from elmgen.hub import load_generator
from elmgen.io import atomic_write_text, remove_temporaries
from elmgen.pipeline.stages import (
    PER_SAMPLE,
    PipelineConfig,
    config_hash,
    finish_run,
    lm_summary,
    run_pipeline,
    sample_stage,
    sampling_summary,
    score_samples,
    shared_dirs,
    start_samples,
)
from elmgen.plots import pyplot, save_figure
from elmgen.sampling import check_classes
from elmgen.stats import mean_interval, paired_bootstrap

# Metrics gathered into the summary table: (column, path in a run's metrics.json, which way is better: +1 higher,
# -1 lower, 0 neither: no best and no test).
SUMMARY_METRICS = (
    ("psnr", ("tokenizer", "psnr"), 1),
    ("code_usage", ("tokenizer", "code_usage"), 1),
    ("final_loss", ("lm", "final_loss"), -1),
    ("params", ("lm", "params"), 0),
    ("fid", ("eval", "fid"), -1),
    ("inception_score", ("eval", "inception_score"), 1),
    ("precision", ("eval", "precision"), 1),
    ("recall", ("eval", "recall"), 1),
    ("class_accuracy", ("eval", "class_accuracy"), 1),
    ("class_confidence", ("eval", "class_confidence"), 1),
)

# The seed field of each stage a replicate can reseed.
RESEED = {"tokenizer": "tokenizer.train.seed", "lm": "lm.train.seed", "sample": "sample.seed"}


@dataclass
class GivenModel:
    """A language model trained elsewhere (an `elmgen import`ed release, a run of `elmgen train`, hf:ORG/NAME)
    whose sampling a sweep varies: no stage trains; every run samples this model and scores its samples against
    `reference` in the feature space of `classifier` (or Inception's)."""

    path: str | None = None  # LM run folder or hf:ORG/NAME; None: the sweep trains its own stages
    tokenizer: str | None = None  # tokenizer run or hf:ORG/NAME (default: the one the LM's codes came from)
    classes: list[int] | None = None  # classes to sample, base.num_per_class each (default: all)
    reference: str | None = None  # images (class folder, 'fashion-mnist', .npz) or statistics to score against
    backend: str = "classifier"  # feature space: classifier (a run of 'elmgen train-classifier') or inception
    classifier: str | None = None  # classifier run, for the classifier backend
    inception_weights: str | None = None  # FID Inception weights file, for the inception backend
    device: str = "auto"  # auto, cpu, cuda[:N] or mps


# What a sweep over a given model may vary: its sampling and how many samples are scored.
GIVEN_MODEL_FIELDS = ("sample.", "num_per_class", "evaluate")


class GivenModelRuns:
    """The model, tokenizer and reference of a GivenModel, loaded once; `run` samples and scores one setting."""

    def __init__(self, given: GivenModel, evaluate: bool):
        device = resolve_device(given.device)
        self.model, _, self.tokenizer, _ = load_generator(given.path, given.tokenizer, device)
        self.classes = given.classes if given.classes is not None else list(range(self.model.cfg.num_classes))
        check_classes(self.classes, self.model.cfg.num_classes)  # before any run
        self.summary = {"path": str(given.path), **lm_summary(self.model.cfg)}
        self.extractor = self.ref = None
        if evaluate:
            if given.reference is None:
                raise ElmgenError(
                    "a sweep over model.path scores its samples against model.reference; set it (images "
                    "or statistics), or base.evaluate=false to keep only the samples"
                )
            self.extractor = load_extractor(given.backend, given.classifier, given.inception_weights, device)
            self.ref = open_reference(given.reference, self.extractor)

    def run(self, cfg: PipelineConfig, run_dir: Path) -> dict:
        start_samples(run_dir)
        t = time.perf_counter()
        labels, seeds = sample_stage(cfg, self.model, self.tokenizer, self.classes, run_dir)
        seconds = {"sample": time.perf_counter() - t}
        evaluation = None
        if cfg.evaluate:
            t = time.perf_counter()
            evaluation = score_samples(run_dir, labels, seeds, self.ref, self.extractor)
            seconds["evaluate"] = time.perf_counter() - t
        metrics = {
            "lm": self.summary,
            "sampling": sampling_summary(cfg, labels),
            "eval": evaluation,
            "seconds": {k: round(v, 1) for k, v in seconds.items()},
        }
        return finish_run(cfg, run_dir, metrics)


def check_given_model(cfg: SweepConfig, settings: list[dict[str, Any]]) -> None:
    """A sweep over a given model varies only what sampling it can change, and replicates reseed only sampling."""
    if cfg.reseed is not None and set(cfg.reseed) - {"sample"}:
        raise ElmgenError(
            f"model.path={cfg.model.path} trains nothing: replicates can reseed only sample, not {cfg.reseed}"
        )
    for setting in settings:
        for key in setting:
            if not key.startswith(GIVEN_MODEL_FIELDS):
                raise ElmgenError(
                    f"the sweep varies {key}, but model.path={cfg.model.path} is sampled as it is: "
                    f"vary sample.* or num_per_class, or drop model.path to train a model per setting"
                )


@dataclass
class SweepConfig:
    base: PipelineConfig = field(default_factory=PipelineConfig)
    grid: dict[str, list[Any]] = field(default_factory=dict)  # dotted field -> values; every combination runs
    runs: list[dict[str, Any]] = field(default_factory=list)  # explicit runs (dotted field -> value) x grid
    stages: str | None = None  # folder of shared stages (default: <out>/stages); point sweeps at one to share
    replicates: int = 1  # runs of every setting; replicate r adds r to the seeds of the reseeded stages
    reseed: list[str] | None = None  # stages replicates reseed: sample, lm, tokenizer (default: sample + those swept)
    model: GivenModel = field(default_factory=GivenModel)  # model.path: sweep the sampling of this model instead
    group_by: list[str] = field(default_factory=list)  # swept fields; the summary marks each setting against the
    # best of the settings that share their values (e.g. [lm.model.d_model]: the best sampling per model size)


@dataclass(frozen=True)
class Run:
    setting: dict[str, Any]  # the swept fields' values: one row of the summary
    replicate: int
    overrides: dict[str, Any]  # the setting and the replicate's seeds

    @property
    def name(self) -> str:
        return run_name(self.overrides)


def expand(cfg: SweepConfig) -> list[dict[str, Any]]:
    """The override sets of every setting, in order: each explicit run crossed with the grid."""
    keys = list(cfg.grid)
    combos = [dict(zip(keys, values, strict=True)) for values in itertools.product(*cfg.grid.values())]
    return [{**run, **combo} for run in (cfg.runs or [{}]) for combo in combos]


def reseeded(cfg: SweepConfig, settings: list[dict[str, Any]]) -> list[str]:
    """The stages a replicate reseeds: `cfg.reseed`, or sampling and each trained stage a swept field changes (a
    tokenizer's change, or the time budget's, changes the LM trained after it too)."""
    if cfg.reseed is not None:
        unknown = [s for s in cfg.reseed if s not in RESEED]
        if unknown or not cfg.reseed:
            raise ElmgenError(f"reseed {list(cfg.reseed)} is not a non-empty list of {', '.join(RESEED)}")
        return list(dict.fromkeys(cfg.reseed))
    swept = {key for setting in settings for key in setting}
    tokenizer = any(key.startswith("tokenizer.") or key == "minutes" for key in swept)
    lm = tokenizer or any(key.startswith("lm.") for key in swept)
    return [stage for stage, on in (("tokenizer", tokenizer), ("lm", lm), ("sample", True)) if on]


def replicate_runs(cfg: SweepConfig) -> list[Run]:
    """Every run, replicate by replicate (a killed sweep has finished whole replicates first); replicate 0 of a
    setting is the setting itself, so adding replicates to a finished sweep reuses its runs."""
    if cfg.replicates < 1:
        raise ElmgenError(f"replicates={cfg.replicates}: a sweep needs at least 1 run per setting")
    settings = expand(cfg)
    seed_fields = [RESEED[stage] for stage in reseeded(cfg, settings)] if cfg.replicates > 1 else []
    clash = [key for key in seed_fields if any(key in setting for setting in settings)]
    if clash:
        raise ElmgenError(f"the sweep varies {clash[0]}, which replicates reseed; set reseed to leave its stage out")
    configs = [apply_overrides(cfg.base, setting) for setting in settings]
    return [
        Run(setting, r, {**setting, **{key: attrgetter(key)(run_cfg) + r for key in seed_fields if r}})
        for r in range(cfg.replicates)
        for setting, run_cfg in zip(settings, configs, strict=True)
    ]


def apply_overrides(base: PipelineConfig, overrides: dict[str, Any]) -> PipelineConfig:
    conf = OmegaConf.structured(base)
    try:
        for key, value in overrides.items():
            if OmegaConf.select(conf, key, default=KeyError) is KeyError:
                raise ElmgenError(f"sweep field {key!r} does not exist in the pipeline config")
            OmegaConf.update(conf, key, value, merge=True)
        return OmegaConf.to_object(conf)
    except OmegaConfBaseException as e:
        raise ElmgenError(f"invalid sweep value: {str(e).splitlines()[0]}") from None


def run_name(overrides: dict[str, Any]) -> str:
    return "run_" + config_hash(overrides) if overrides else "run_base"


def run_sweep(cfg: SweepConfig, out_dir: str | Path) -> list[dict]:
    """Run every missing run, then write runs.csv (every run), summary.csv and summary.md (every setting over its
    replicates), differences.csv (every two settings) and one plot per swept field; returns the rows of runs.csv."""
    out = Path(out_dir)
    if out.is_dir():
        remove_temporaries(out, "summary", "runs.csv", "differences.csv", "plot_")
    runs = replicate_runs(cfg)
    unswept = [key for key in cfg.group_by if not any(key in run.setting for run in runs)]
    if unswept:
        raise ElmgenError(f"group_by names {unswept[0]}, which the sweep does not vary; group by a swept field")
    configs = [apply_overrides(cfg.base, run.overrides) for run in runs]  # validate every run before training any
    given = None
    if cfg.model.path is not None:
        check_given_model(cfg, [run.setting for run in runs])
        given = GivenModelRuns(cfg.model, any(run_cfg.evaluate for run_cfg in configs))
    for run_cfg in configs:
        run_cfg.sample.validate(given.model.vocab_size if given else run_cfg.lm.model.vocabulary.size)
        run_cfg.classifier.validate()
    rows, samples = [], []
    for i, (run, run_cfg) in enumerate(zip(runs, configs, strict=True)):
        run_dir = out / "runs" / run.name
        metrics_file = run_dir / "metrics.json"
        if metrics_file.is_file():
            metrics = json.loads(metrics_file.read_text())
        else:
            which = f", replicate {run.replicate}" if cfg.replicates > 1 else ""
            print(f"[sweep] run {i + 1}/{len(runs)}: {run.setting or 'base'}{which}", flush=True)
            if given:
                metrics = given.run(run_cfg, run_dir)
            else:
                metrics = run_pipeline(run_cfg, shared_dirs(run_cfg, cfg.stages or out / "stages", run_dir))
        rows.append({"run": run.name, **run.setting, "replicate": run.replicate, **summary_values(metrics)})
        per_sample = run_dir / PER_SAMPLE  # runs from before per-sample scores have none: compared per replicate
        samples.append(json.loads(per_sample.read_text()) if per_sample.is_file() else {})
    swept = list(dict.fromkeys(key for run in runs for key in run.setting))
    settings, differences = summarize(runs, rows, samples, cfg.group_by)
    write_summary(rows, settings, differences, swept, out, cfg.group_by)
    return rows


def summary_values(metrics: dict) -> dict:
    values = {}
    for column, path, _ in SUMMARY_METRICS:
        node = metrics
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:
            values[column] = node
    return values


@dataclass
class Setting:
    """One setting's results: each metric's value per replicate, and per sample keyed by (replicate, seed)."""

    row: dict[str, Any]
    replicates: dict[str, dict[int, float]] = field(default_factory=dict)
    samples: dict[str, dict[tuple[int, int], float]] = field(default_factory=dict)


def summarize(
    runs: list[Run], rows: list[dict], samples: list[dict], group_by: list[str] = ()
) -> tuple[list[dict], list[dict]]:
    """One row per setting: each metric's mean over the replicates and its 95% half-width (`<metric>_ci`), the
    difference from the column's best setting (`<metric>_vs_best`; with `group_by`, the best of the settings
    with the same values of those fields) and whether it is significant (True/False; None where no test
    applies); and the paired difference of every two settings per metric (`compare`)."""
    groups: dict[str, Setting] = {}
    for run, row, per_sample in zip(runs, rows, samples, strict=True):
        key = json.dumps(run.setting, sort_keys=True)
        group = groups.setdefault(key, Setting({"run": run.name, **run.setting}))
        for metric, _, _ in SUMMARY_METRICS:
            if metric in row:
                group.replicates.setdefault(metric, {})[run.replicate] = row[metric]
            if metric in per_sample:
                scores = zip(per_sample["seed"], per_sample[metric], strict=True)
                group.samples.setdefault(metric, {}).update(((run.replicate, s), v) for s, v in scores)
    for group in groups.values():
        group.row["replicates"] = max(len(v) for v in group.replicates.values()) if group.replicates else 0
        for metric, values in group.replicates.items():
            group.row[metric], group.row[f"{metric}_ci"] = mean_interval(list(values.values()))
    differences = []
    for metric, _, better in SUMMARY_METRICS:
        have = [g for g in groups.values() if metric in g.row]
        if not have or not better:
            continue
        best = {}  # per group_by values, the best setting
        for group in have:
            key = json.dumps([group.row.get(k) for k in group_by])
            if key not in best or better * group.row[metric] > better * best[key].row[metric]:
                best[key] = group
        for group in have:
            vs_best = compare(best[json.dumps([group.row.get(k) for k in group_by])], group, metric)
            group.row[f"{metric}_vs_best"], group.row[f"{metric}_significant"] = vs_best["diff"], vs_best["significant"]
        differences += [compare(a, b, metric) for a, b in itertools.combinations(have, 2)]
    metric_columns = [
        f"{m}{suffix}" for m, _, _ in SUMMARY_METRICS for suffix in ("", "_ci", "_vs_best", "_significant")
    ]
    rows = [
        {
            **{k: v for k, v in g.row.items() if k not in metric_columns},
            **{k: g.row[k] for k in metric_columns if k in g.row},
        }
        for g in groups.values()
    ]
    return rows, differences


def compare(a: Setting, b: Setting, metric: str) -> dict:
    """b - a for one metric with its 95% interval, whether that excludes 0 (None: untestable) and the test: a
    paired bootstrap over the samples both have, else a paired t-interval over their common replicates (a metric
    no replicate changes, such as a shared tokenizer's PSNR, is untestable)."""
    out = {"metric": metric, "a": a.row["run"], "b": b.row["run"], "diff": b.row[metric] - a.row[metric]}
    untested = {**out, "low": math.nan, "high": math.nan, "significant": None, "test": ""}
    if a is b:
        return untested
    sa, sb = a.samples.get(metric, {}), b.samples.get(metric, {})
    common = sorted(sa.keys() & sb.keys())
    if len(common) >= 2:
        test = paired_bootstrap([sa[k] for k in common], [sb[k] for k in common])
        return {**out, **test, "test": f"paired bootstrap over {len(common)} samples"}
    ra, rb = a.replicates[metric], b.replicates[metric]
    diffs = [rb[r] - ra[r] for r in sorted(ra.keys() & rb.keys())]
    if len(diffs) >= 2:
        diff, half = mean_interval(diffs)
        if half > 0:
            test = {"diff": diff, "low": diff - half, "high": diff + half, "significant": abs(diff) > half}
            return {**out, **test, "test": f"paired t over {len(diffs)} replicates"}
    return untested


def fmt(value) -> str:
    if isinstance(value, float) and math.isnan(value):
        return ""
    if isinstance(value, float):
        return f"{value:.0f}" if value.is_integer() and abs(value) >= 1e4 else f"{value:.4g}"
    return str(value)


def write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    blank = lambda v: v is None or (isinstance(v, float) and math.isnan(v))  # noqa: E731
    writer.writerows([{k: "" if blank(v) else v for k, v in row.items()} for row in rows])
    atomic_write_text(path, table.getvalue())


def write_summary(
    rows: list[dict], settings: list[dict], differences: list[dict], swept: list[str], out: Path, group_by=()
) -> None:
    write_csv(out / "runs.csv", rows)
    write_csv(out / "summary.csv", settings)
    write_csv(out / "differences.csv", differences)
    tests: dict[str, list[str]] = {}  # per metric, the tests its comparisons used
    for d in differences:
        if d["test"] and d["test"] not in tests.setdefault(d["metric"], []):
            tests[d["metric"]].append(d["test"])
    metrics = [m for m, _, _ in SUMMARY_METRICS if any(m in row for row in settings)]
    columns = ["run", *swept, "replicates", *metrics]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(summary_cell(row, c) for c in columns) + " |" for row in settings]
    lines += [
        "",
        "Each value is the mean over the replicates ± the half-width of its 95% t-interval. Per column, **bold** is "
        f"the best setting{' of each ' + ' x '.join(group_by) if group_by else ''}, `*` a setting significantly "
        "different from it, `~` one within the noise, and no mark an untested one; differences.csv compares every "
        "two settings.",
    ]
    lines += [f"- {metric}: {'; '.join(used)}" for metric, used in tests.items()]
    atomic_write_text(out / "summary.md", "\n".join(lines) + "\n")
    for key in swept:
        if len({json.dumps(row.get(key)) for row in rows}) > 1:
            plot_metric_vs(rows, key, metrics, out / f"plot_{key.replace('.', '_')}.png")


def summary_cell(row: dict, column: str) -> str:
    """A summary.md cell: a metric as `mean ± half-width` with its mark against the column's best."""
    if column not in row or f"{column}_ci" not in row:
        return fmt(row.get(column, ""))
    text = fmt(row[column]) + (f" ± {row[f'{column}_ci']:.2g}" if not math.isnan(row[f"{column}_ci"]) else "")
    if row.get(f"{column}_vs_best") == 0.0 and row.get(f"{column}_significant") is None:
        return f"**{text}**"
    return text + {True: " *", False: " ~"}.get(row.get(f"{column}_significant"), "")


def plot_metric_vs(rows: list[dict], key: str, metrics: list[str], path: Path) -> None:
    """One panel per metric: its value against the swept field (other fields averaged over within a replicate),
    with the 95% interval over the replicates as error bars."""
    plt = pyplot()
    values = list(dict.fromkeys(json.dumps(row.get(key)) for row in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3), dpi=110, squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        means, halves = [], []
        for v in values:
            by_replicate: dict[int, list[float]] = {}
            for row in rows:
                if json.dumps(row.get(key)) == v and metric in row:
                    by_replicate.setdefault(row["replicate"], []).append(row[metric])
            got = [float(np.mean(x)) for x in by_replicate.values()]
            mean, half = mean_interval(got) if got else (math.nan, math.nan)
            means.append(mean)
            halves.append(0.0 if math.isnan(half) else half)
        ax.errorbar(range(len(values)), means, yerr=halves, fmt="o-", capsize=3)
        ax.set_xticks(range(len(values)), [json.loads(v) for v in values], rotation=30)
        ax.set_title(metric)
        ax.set_xlabel(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)

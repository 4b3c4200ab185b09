"""Design-space sweeps: a grid (and/or list) of pipeline runs that share whatever stages they can.

Each run is the base PipelineConfig with some dotted fields overridden. Stage folders are keyed by
the configs that determine them, so runs differing only in sampling share one model, runs differing
only in the LM share one tokenizer and code folder. A run whose metrics.json exists is skipped:
re-running a finished sweep does no work, and a killed sweep completes only what is missing.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from elmgen.errors import ElmgenError
from elmgen.io import atomic_write_text, remove_temporaries
from elmgen.pipeline.stages import PipelineConfig, config_hash, run_pipeline, shared_dirs
from elmgen.plots import pyplot, save_figure

# Metrics gathered into the summary table: (column, path in a run's metrics.json).
SUMMARY_METRICS = (
    ("psnr", ("tokenizer", "psnr")),
    ("code_usage", ("tokenizer", "code_usage")),
    ("final_loss", ("lm", "final_loss")),
    ("params", ("lm", "params")),
    ("fid", ("eval", "fid")),
    ("inception_score", ("eval", "inception_score")),
    ("precision", ("eval", "precision")),
    ("recall", ("eval", "recall")),
    ("class_accuracy", ("eval", "class_accuracy")),
)


@dataclass
class SweepConfig:
    base: PipelineConfig = field(default_factory=PipelineConfig)
    grid: dict[str, list[Any]] = field(default_factory=dict)  # dotted field -> values; every combination runs
    runs: list[dict[str, Any]] = field(default_factory=list)  # explicit runs (dotted field -> value) x grid
    stages: str | None = None  # folder of shared stages (default: <out>/stages); point sweeps at one to share


def expand(cfg: SweepConfig) -> list[dict[str, Any]]:
    """The override sets of every run, in order: each explicit run crossed with the grid."""
    keys = list(cfg.grid)
    combos = [dict(zip(keys, values, strict=True)) for values in itertools.product(*cfg.grid.values())]
    return [{**run, **combo} for run in (cfg.runs or [{}]) for combo in combos]


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
    """Run every missing run, then write summary.csv, summary.md and one plot per swept field."""
    out = Path(out_dir)
    if out.is_dir():
        remove_temporaries(out, "summary", "plot_")
    runs = expand(cfg)
    configs = [apply_overrides(cfg.base, o) for o in runs]  # validate every run before training any
    for run_cfg in configs:
        run_cfg.sample.validate(run_cfg.lm.model.vocabulary.size)
    rows = []
    for i, (overrides, run_cfg) in enumerate(zip(runs, configs, strict=True)):
        run_dir = out / "runs" / run_name(overrides)
        metrics_file = run_dir / "metrics.json"
        if metrics_file.is_file():
            metrics = json.loads(metrics_file.read_text())
        else:
            print(f"[sweep] run {i + 1}/{len(runs)}: {overrides or 'base'}", flush=True)
            metrics = run_pipeline(run_cfg, shared_dirs(run_cfg, cfg.stages or out / "stages", run_dir))
        rows.append({"run": run_name(overrides), **overrides, **summary_values(metrics)})
    write_summary(rows, list(dict.fromkeys(k for o in runs for k in o)), out)
    return rows


def summary_values(metrics: dict) -> dict:
    values = {}
    for column, path in SUMMARY_METRICS:
        node = metrics
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:
            values[column] = node
    return values


def write_summary(rows: list[dict], swept: list[str], out: Path) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "summary.csv", table.getvalue())
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    atomic_write_text(out / "summary.md", "\n".join(lines) + "\n")
    metrics = [c for c, _ in SUMMARY_METRICS if any(c in row for row in rows)]
    for key in swept:
        if len({json.dumps(row.get(key)) for row in rows}) > 1:
            plot_metric_vs(rows, key, metrics, out / f"plot_{key.replace('.', '_')}.png")


def plot_metric_vs(rows: list[dict], key: str, metrics: list[str], path: Path) -> None:
    """One panel per metric: its value against the swept field (other fields averaged over)."""
    plt = pyplot()
    values = list(dict.fromkeys(json.dumps(row.get(key)) for row in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3), dpi=110, squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        means = []
        for v in values:
            got = [row[metric] for row in rows if json.dumps(row.get(key)) == v and metric in row]
            means.append(sum(got) / len(got) if got else float("nan"))
        ax.plot(range(len(values)), means, "o-")
        ax.set_xticks(range(len(values)), [json.loads(v) for v in values], rotation=30)
        ax.set_title(metric)
        ax.set_xlabel(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)

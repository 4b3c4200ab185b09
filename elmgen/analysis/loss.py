"""How far the training loss falls: loss curves of LM runs normalised by ln V, and the final loss against
model size."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from elmgen import checkpoint
from elmgen.analysis.names import run_names
from elmgen.config import from_dict
from elmgen.errors import ElmgenError
from elmgen.io import atomic_write_text, read_metrics
from elmgen.models import ModelConfig, count_params
from elmgen.plots import pyplot, save_figure


def run_losses(path) -> dict:
    """A language-model run's logged losses, its vocabulary and size."""
    ckpt = checkpoint.resolve(path)
    meta = checkpoint.load_config(ckpt)
    if meta.get("kind") != "lm":
        raise ElmgenError(f"{path} is not a language-model run (kind {meta.get('kind')!r})")
    rows = read_metrics(ckpt.parent.parent / "metrics.jsonl")
    if not rows:
        raise ElmgenError(f"{ckpt.parent.parent} has no metrics.jsonl to read losses from")
    cfg = from_dict(ModelConfig, meta["model"])
    ln_v = math.log(cfg.vocabulary.size)
    return {
        "path": str(path),
        "kind": cfg.kind,
        "vocab": cfg.vocab,
        "ln_vocab": ln_v,
        "params": count_params(cfg),
        "n_layer": cfg.n_layer,
        "d_model": cfg.d_model,
        "steps": [r["step"] for r in rows],
        "loss": [r["loss"] for r in rows],
        "final_step": rows[-1]["step"],
        "final_loss": rows[-1]["loss"],
        "final_loss_norm": rows[-1]["loss"] / ln_v,
    }


def analyze_loss(runs: list, out_dir) -> dict:
    """loss.json and loss.png: loss / ln V over training for every run, and the final loss against size."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reports = {name: run_losses(p) for name, p in zip(run_names(runs), runs, strict=True)}
    atomic_write_text(out / "loss.json", json.dumps(reports, indent=2))
    plt = pyplot()
    fig, (ax_c, ax_s) = plt.subplots(1, 2, figsize=(11, 3.8), dpi=110)
    for name, r in reports.items():
        label = f"{name}: {r['kind']} {r['vocab']}, {r['params'] / 1e6:.2f}M"
        ax_c.plot(r["steps"], np.asarray(r["loss"]) / r["ln_vocab"], lw=1.5, label=label)
        ax_s.scatter(r["params"], r["final_loss_norm"])
        ax_s.annotate(
            f"{name} ({r['final_step']} steps)",
            (r["params"], r["final_loss_norm"]),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax_c.axhline(1.0, color="grey", ls="--", lw=1, label="ln V (uniform guess)")
    ax_c.set(xlabel="step", ylabel="loss / ln V", title="training loss per sub-code, normalised")
    ax_c.legend(fontsize=7)
    ax_s.set(xscale="log", xlabel="parameters", ylabel="final loss / ln V", title="final loss against model size")
    for ax in (ax_c, ax_s):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out / "loss.png")
    return reports

"""The whole ELM path on Fashion-MNIST or a folder of your images in one resumable command, with a report."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

from elmgen.data import DataConfig
from elmgen.io import atomic_write_text, read_metrics, remove_temporaries
from elmgen.pipeline.stages import SHIFT_RANGE, PipelineConfig, StageDirs, run_pipeline
from elmgen.plots import loss_curve
from elmgen.vocab import Vocab


def run_demo(cfg: PipelineConfig, out_dir: str | Path) -> dict:
    """The pipeline with fixed stage folders under `out_dir`, then the pictures and report.md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_temporaries(out, "report.md", "reconstructions.png", "loss.png")
    dirs = StageDirs(out / "tokenizer", out / "codes", out / "lm", out, out / "classifier")
    metrics = run_pipeline(cfg, dirs)
    (out / "reconstructions.png").write_bytes((dirs.tokenizer / "reconstructions.png").read_bytes())
    vocab = Vocab.parse(cfg.lm.model.vocab)
    loss_curve(
        read_metrics(dirs.lm / "metrics.jsonl"),
        out / "loss.png",
        title=f"{cfg.lm.model.kind.upper()} training loss (vocabulary {vocab})",
        hline=math.log(vocab.size),
        hline_label=f"ln {vocab.size}: uniform guess",
    )
    class_names = json.loads((dirs.codes / "meta.json").read_text())["class_names"]
    atomic_write_text(out / "report.md", render_report(metrics, class_names, cfg.tokenizer.data))
    return metrics


def quick_demo(cfg: PipelineConfig) -> PipelineConfig:
    """A short smoke run of the same pipeline on a data subset (looks worse, proves the wiring)."""
    tok, lm, clf = cfg.tokenizer, cfg.lm, cfg.classifier
    return replace(
        cfg,
        tokenizer=replace(
            tok,
            data=replace(tok.data, limit=2000),
            eval_images=200,
            train=replace(tok.train, steps=60, warmup_steps=10, save_every=60),
        ),
        lm=replace(lm, train=replace(lm.train, steps=40, warmup_steps=5, save_every=40)),
        classifier=replace(clf, train=replace(clf.train, steps=40, warmup_steps=5, save_every=40)),
        num_per_class=2,
        reference_images=500,
    )


def data_title(data: DataConfig) -> str:
    return "Fashion-MNIST" if data.source == "fashion-mnist" else f"{Path(data.source).name}/ (your images)"


def render_report(m: dict, class_names: list[str], data: DataConfig) -> str:
    tok, lm, s = m["tokenizer"], m["lm"], m["sampling"]
    rows = "\n".join(f"| {i} | {name} |" for i, name in enumerate(class_names))
    per_class = "\n".join(
        f"| {name} | {'-' if v is None else f'{v:.2f}'} |"
        for name, v in zip(class_names, tok.get("psnr_per_class") or [], strict=False)
    )
    return f"""# elmgen: {data_title(data)} with a binary tokenizer and an autoregressive transformer

## 1. Tokenizer (binary autoencoder)
Each {data.image_size}x{data.image_size} image becomes a {tok["grid"][0]}x{tok["grid"][1]} grid of {tok["bits"]}-bit
binary codes. On {tok["images"]} images of {tok["dataset"]}:

| PSNR (dB) | distinct codes | code usage | mean per-bit entropy (bits) |
|---|---|---|---|
| {tok["psnr"]:.2f} | {tok["distinct_codes"]} | {tok["code_usage"]:.3f} | {tok["bit_entropy"]:.3f} |

Per class:

| class | PSNR (dB) |
|---|---|
{per_class}

Code usage is distinct codes / min(2^K, cells encoded). `reconstructions.png`: originals on top,
reconstructions from deterministic codes below.

![reconstructions](reconstructions.png)

## 2. Language model
Vocabulary design {lm["vocab"]}: each cell's code is split into {lm["vocab"].split("-")[0]} sub-codes of
{lm["vocab"].split("-")[1]} bits, embedded and predicted separately. The transformer ({lm["layers"]} layers,
width {lm["width"]}, {lm["params"] / 1e6:.2f}M parameters) trained {lm["steps"]} steps{render_views(lm.get("views"))};
final training loss {lm["final_loss"]:.3f} nats per sub-code, against {lm["uniform_loss"]:.3f} for a uniform guess.
As the paper finds, the loss of an image-token LM stays far above zero even when samples look right:
image tokens are close to random.

![loss](loss.png)

## 3. Samples
`samples.png` shows {s["num_per_class"]} samples per class, one row per class (top to bottom):

| row | class |
|---|---|
{rows}

Sampling: classifier-free guidance scale {s["guidance_scale"]} ({s["guidance_schedule"]} schedule), temperature
{s["temperature"]}, top-k {s["top_k"] or "off"}, top-p {s["top_p"]}, seed {s["seed"]}, KV cache on.
`samples.npz` holds the same {s["images"]} images in ADM layout (`arr_0` uint8 NHWC, `arr_1` labels).

![samples](samples.png)
{render_eval(m.get("eval"))}
## Time
{", ".join(f"{k}: {v:.0f} s" for k, v in m["seconds"].items())}
{render_budget(m.get("budget"))}"""


def render_views(v: dict | None) -> str:
    """How the LM's training codes were made from the images, when not one deterministic code each."""
    shifts = (v or {}).get("shifts", 0)  # (runs made before shifted views have none)
    if not v or not (v["flip"] or shifts or v["draws"]):
        return ""
    views = "each training image" + (" and its mirror image" if v["flip"] else "")
    if shifts:
        share = Fraction((SHIFT_RANGE - 1) / 2).limit_denominator(100)
        views = f"{shifts} copies, shifted by up to {share} of the side each way, of {views}"
    return f" on {v['draws']} Bernoulli draws of the codes of {views}" if v["draws"] else f" on the codes of {views}"


def render_budget(b: dict | None) -> str:
    if not b:
        return ""
    steps = ", ".join(f"{name} {n}" for name, n in b["steps"].items())
    return (
        f"\nUnder a budget of {b['minutes']:g} minutes (`--minutes`), each training stage chose its step count "
        f"from the pace of its first steps: {steps}.\n"
    )


def render_eval(e: dict | None) -> str:
    if not e:
        return ""
    space = e["feature_space"]
    per_class = "\n".join(f"| {name} | {acc:.2f} |" for name, acc in (e.get("per_class_accuracy") or {}).items())
    return f"""
## 4. Evaluation
Measured in the feature space of the project's own classifier ({space["name"]}, fingerprint
{space["fingerprint"]}, trained on {space["dataset"]}, test accuracy {e["classifier_test_accuracy"]:.3f}),
not Inception: these numbers compare runs of this project, not papers. {e["num_samples"]} samples against
{e["num_reference"]} training images.

| FID | Inception Score | precision | recall | class accuracy |
|---|---|---|---|---|
| {e["fid"]:.2f} | {e["inception_score"]:.2f} | {e["precision"]:.3f} | {e["recall"]:.3f} | {e["class_accuracy"]:.3f} |

Class accuracy: the share of samples the classifier assigns to the class they were generated for.
Per class:

| class | class accuracy |
|---|---|
{per_class}

With only {e["num_samples"]} samples, FID is biased upwards; compare it across runs of equal size.
{render_ceiling(e.get("reconstructions"))}"""


def render_ceiling(r: dict | None) -> str:
    if not r:
        return ""
    return f"""
The tokenizer's reconstructions of {r["num_samples"]} held-out images, scored the same way, are the most the
samples can reach here (the language model only chooses codes for this decoder):

| FID | precision | recall | class accuracy |
|---|---|---|---|
| {r["fid"]:.2f} | {r["precision"]:.3f} | {r["recall"]:.3f} | {r["class_accuracy"]:.3f} |
"""

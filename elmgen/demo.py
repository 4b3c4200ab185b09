"""The whole ELM path on Fashion-MNIST in one resumable command, with a report."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from elmgen import checkpoint
from elmgen.codes import tokenize
from elmgen.config import save_yaml, to_dict
from elmgen.data import load_dataset
from elmgen.model import ModelConfig, count_params, load_model, preset
from elmgen.plots import loss_curve
from elmgen.sampling import SampleConfig, class_balanced, image_seeds, sample_images, write_samples
from elmgen.tokenizer import TokenizerConfig, load_tokenizer
from elmgen.train import LMJob, TokenizerJob, train_lm, train_tokenizer
from elmgen.training import TrainConfig, read_metrics
from elmgen.vocab import Vocab


@dataclass
class DemoConfig:
    tokenizer: TokenizerJob = field(default_factory=lambda: TokenizerJob(
        tokenizer=TokenizerConfig(base_width=32, channel_mult=[1, 2, 2], num_res_blocks=1, num_bits=16),
        train=TrainConfig(steps=1200, batch_size=64, lr=2e-3, warmup_steps=100, lr_decay="cosine",
                          weight_decay=0.0, precision="bf16", save_every=300),
    ))
    lm: LMJob = field(default_factory=lambda: LMJob(
        model=ModelConfig(**preset("tiny"), vocab="2-8"),
        train=TrainConfig(steps=700, batch_size=128, lr=2e-3, warmup_steps=100, lr_decay="cosine",
                          min_lr=1e-4, precision="bf16", save_every=100),
    ))
    sample: SampleConfig = field(default_factory=lambda: SampleConfig(cfg_scale=3.0, cfg_schedule="linear"))
    num_per_class: int = 10


def run_demo(cfg: DemoConfig, out_dir: str | Path) -> dict:
    """Tokenizer -> codes -> AR model -> samples, each stage skipped when already complete."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, out / "demo.yaml")
    timings: dict[str, float] = {}

    t = time.perf_counter()
    tok_dir = out / "tokenizer"
    train_tokenizer(cfg.tokenizer, tok_dir, resume=checkpoint.has_checkpoint(tok_dir))
    tokenizer, tok_meta = load_tokenizer(tok_dir)
    tok_eval = json.loads((tok_dir / "eval.json").read_text())
    (out / "reconstructions.png").write_bytes((tok_dir / "reconstructions.png").read_bytes())
    timings["tokenizer"] = time.perf_counter() - t

    t = time.perf_counter()
    codes_dir = out / "codes"
    vocab = Vocab.parse(cfg.lm.model.vocab)
    if not (codes_dir / "meta.json").is_file():
        tokenize(tokenizer, tok_meta, load_dataset(cfg.tokenizer.data), codes_dir, vocab)
    timings["tokenize"] = time.perf_counter() - t

    t = time.perf_counter()
    lm_dir = out / "lm"
    train_lm(cfg.lm, codes_dir, lm_dir, resume=checkpoint.has_checkpoint(lm_dir))
    model, _ = load_model(lm_dir)
    rows = read_metrics(lm_dir / "metrics.jsonl")
    loss_curve(rows, out / "loss.png", title=f"AR training loss (vocabulary {vocab})",
               hline=math.log(vocab.size), hline_label=f"ln {vocab.size}: uniform guess")
    timings["lm"] = time.perf_counter() - t

    t = time.perf_counter()
    labels, index_in_class = class_balanced(list(range(len(tok_meta["class_names"]))), cfg.num_per_class)
    seeds = image_seeds(cfg.sample.seed, labels, index_in_class)
    images = sample_images(model, tokenizer, labels, seeds, cfg.sample)
    write_samples(images, labels, seeds, out, ncols=cfg.num_per_class)
    timings["sample"] = time.perf_counter() - t

    metrics = {
        "tokenizer": {k: v for k, v in tok_eval.items() if k != "bit_mean"},
        "lm": {
            "layers": cfg.lm.model.n_layer, "width": cfg.lm.model.d_model, "vocab": str(vocab),
            "params": count_params(cfg.lm.model),
            "steps": rows[-1]["step"], "final_loss": rows[-1]["loss"], "uniform_loss": math.log(vocab.size),
            "tokens_per_s": rows[-1].get("tok_per_s"),
        },
        "sampling": {**to_dict(cfg.sample), "num_per_class": cfg.num_per_class, "images": len(labels)},
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    checkpoint.atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    checkpoint.atomic_write_text(out / "report.md", render_report(metrics, tok_meta["class_names"]))
    return metrics


def render_report(m: dict, class_names: list[str]) -> str:
    tok, lm, s = m["tokenizer"], m["lm"], m["sampling"]
    rows = "\n".join(f"| {i} | {name} |" for i, name in enumerate(class_names))
    return f"""# elmgen demo: Fashion-MNIST with a binary tokenizer and an autoregressive transformer

## 1. Tokenizer (binary autoencoder)
Each 32x32 image becomes a {tok['grid'][0]}x{tok['grid'][1]} grid of {tok['bits']}-bit binary codes.
On {tok['images']} held-out images ({tok['dataset']}):

| PSNR (dB) | distinct codes | code usage | mean per-bit entropy (bits) |
|---|---|---|---|
| {tok['psnr']:.2f} | {tok['distinct_codes']} | {tok['code_usage']:.3f} | {tok['bit_entropy']:.3f} |

Code usage is distinct codes / min(2^K, cells encoded). `reconstructions.png`: originals on top,
reconstructions from deterministic codes below.

![reconstructions](reconstructions.png)

## 2. Language model
Vocabulary design {lm['vocab']}: each cell's code is split into {lm['vocab'].split('-')[0]} sub-codes of
{lm['vocab'].split('-')[1]} bits, embedded and predicted separately. The transformer ({lm['layers']} layers,
width {lm['width']}, {lm['params'] / 1e6:.2f}M parameters) trained {lm['steps']} steps; final training loss
{lm['final_loss']:.3f} nats per sub-code, against {lm['uniform_loss']:.3f} for a uniform guess. As the
paper finds, the loss of an image-token LM stays far above zero even when samples look right:
image tokens are close to random.

![loss](loss.png)

## 3. Samples
`samples.png` shows {s['num_per_class']} samples per class, one row per class (top to bottom):

| row | class |
|---|---|
{rows}

Sampling: classifier-free guidance scale {s['cfg_scale']} ({s['cfg_schedule']} schedule), temperature
{s['temperature']}, top-k {s['top_k'] or 'off'}, top-p {s['top_p']}, seed {s['seed']}, KV cache on.
`samples.npz` holds the same {s['images']} images in ADM layout (`arr_0` uint8 NHWC, `arr_1` labels).

![samples](samples.png)

## Time
{', '.join(f'{k}: {v:.0f} s' for k, v in m['seconds'].items())}
"""

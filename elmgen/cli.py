"""`elmgen` command line: thin wrappers over the library; every failure the user can fix is one line."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from elmgen import __version__
from elmgen.config import build_config, to_dict
from elmgen.errors import ElmgenError
from elmgen.sampling import CFG_SCHEDULES

OVERRIDES_HELP = "config overrides as key=value, e.g. train.steps=500 tokenizer.num_bits=12"


class Parser(argparse.ArgumentParser):
    """Usage errors are one line, as every other error (the full usage is one --help away)."""

    def error(self, message):
        self.exit(2, f"elmgen: error: {message} (see '{self.prog} --help')\n")


def int_at_least(lo: int):
    """An argparse type: an integer >= lo, or a one-line usage error naming the option."""
    def parse(text: str) -> int:
        value = int(text)  # a ValueError becomes argparse's "invalid int value"
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, not {value}")
        return value

    parse.__name__ = "int"
    return parse


positive_int, nonneg_int = int_at_least(1), int_at_least(0)


def positive_float(text: str) -> float:
    value = float(text)  # a ValueError becomes argparse's "invalid float value"
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number > 0, not {text}")
    return value


positive_float.__name__ = "float"


def out_path(folder: bool):
    """An argparse type for --out: refuse, before any work, a path elmgen could not write its results to (a
    file where a folder goes or the reverse, a file among its parents, a place it may not create files in)."""
    def check(text: str) -> str:
        path = Path(text)
        if path.exists() and path.is_dir() != folder:
            raise argparse.ArgumentTypeError(f"{path} is a {'file' if folder else 'folder'}; pass a "
                                             f"{'folder' if folder else 'file'} path")
        parent = path if folder else path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise argparse.ArgumentTypeError(f"cannot write {path}: {parent} is a file, not a folder")
        try:  # a real probe: permissions, read-only file systems and root's privileges all answer here
            with tempfile.TemporaryFile(dir=parent):
                pass
        except OSError as e:
            raise argparse.ArgumentTypeError(f"cannot write {path}: {parent} is not writable ({e.strerror})") from None
        return text

    check.__name__ = "path"
    return check


out_folder, out_file = out_path(folder=True), out_path(folder=False)


def _common(p: argparse.ArgumentParser, config_help: str) -> None:
    p.add_argument("--config", metavar="YAML", help=config_help)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)


def _train_options(p: argparse.ArgumentParser) -> None:
    """Training-loop switches; each is a shortcut for a train.* override (see _train_overrides)."""
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--precision", choices=["fp32", "bf16", "auto"],
                   help="bf16: autocast matmuls to bfloat16; auto: bf16 where the device computes it natively")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    p.add_argument("--grad-accum", type=positive_int, metavar="N", help="split each batch into N micro-batches")
    p.add_argument("--ema-decay", type=float, metavar="D", help="keep an EMA of the weights (0: none)")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the model (FSDP) instead of DDP")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute block activations in the backward pass (less memory, ~30%% more compute)")


def _train_overrides(a) -> list[str]:
    flags = {"precision": a.precision, "compile": a.compile or None, "grad_accum": a.grad_accum,
             "ema_decay": a.ema_decay, "fsdp": a.fsdp or None,
             "activation_checkpointing": a.activation_checkpointing or None}
    return a.overrides + [f"train.{k}={v}" for k, v in flags.items() if v is not None]


def _lm_options(p: argparse.ArgumentParser, kind: str) -> None:
    p.add_argument("--model", required=True, help=f"{kind} run folder or checkpoint")
    p.add_argument("--tokenizer", help="tokenizer run folder (default: the one the LM's codes came from)")
    p.add_argument("--no-ema", action="store_true", help="use the trained weights, not their EMA (if kept)")
    p.add_argument("--device", default="auto")


def _sampling_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("--cfg-scale", type=float, default=3.0, help="classifier-free guidance scale; 1 disables")
    s.add_argument("--cfg-schedule", default="linear", choices=list(CFG_SCHEDULES),
                   help="ramp of the guidance scale over the steps (default: linear)")
    s.add_argument("--cfg-power", type=float, default=2.0, help="exponent of the 'power' schedule")
    s.add_argument("--cfg-interval", type=float, nargs=2, default=[0.0, 1.0], metavar=("LO", "HI"),
                   help="guide only while the step's progress (t+1)/T is in [LO, HI]")
    s.add_argument("--temperature", type=float, default=1.0, help="0 samples greedily")
    s.add_argument("--temperature-end", type=float, help="move the temperature linearly to this over the steps")
    s.add_argument("--top-k", type=int, default=0, help="keep the k most likely entries per sub-code (0: all)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass per sub-code")
    s.add_argument("--seed", type=nonneg_int, default=0)
    s.add_argument("--no-kv-cache", action="store_true", help="AR: recompute the prefix each step (slow; for checks)")
    s.add_argument("--compile", action="store_true", help="AR: torch.compile the decode step (pays off on GPUs)")
    s.add_argument("--steps", type=int, default=10, help="MLM: MaskGIT decoding steps")
    s.add_argument("--mask-noise", type=float, default=4.5,
                   help="MLM: scale of the Gumbel noise on confidences (annealed to 0)")
    s.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: autocast the transformer, bfloat16 KV cache (several times faster on CPUs with "
                        "bf16 units and on GPUs)")


def cmd_train_tokenizer(a) -> None:
    from elmgen.train import TokenizerJob, train_tokenizer

    base = {"data": {"source": a.data}} if a.data else {}
    loss = {"gan": True} if a.gan else {}
    if a.perceptual_weights:
        loss["perceptual_weights"] = a.perceptual_weights
    job = build_config(TokenizerJob, a.config, _train_overrides(a), **base, **({"loss": loss} if loss else {}))
    report = train_tokenizer(job, a.out, resume=a.resume)
    if report:  # under torchrun only the main process reports
        print_report(report)


def print_report(report: dict) -> None:
    """A tokenizer report without its per-bit lists (they stay in eval.json)."""
    print(json.dumps({k: v for k, v in report.items() if k not in ("bit_mean", "bit_entropies")}, indent=2))


def cmd_tokenize(a) -> None:
    from elmgen.codes import crop_source_size, tokenize
    from elmgen.data import DataConfig, load_dataset
    from elmgen.tokenizer import load_tokenizer
    from elmgen.vocab import Vocab

    tokenizer, meta = load_tokenizer(a.tokenizer)
    data = DataConfig(source=a.data or meta["data"]["source"], split=a.split, channels=meta["channels"],
                      image_size=crop_source_size(meta["image_size"], a.crop_range), limit=a.limit)
    vocab = Vocab.parse(a.vocab) if a.vocab else tokenizer.default_vocab
    out = tokenize(tokenizer, meta, load_dataset(data), a.out, vocab, flip=a.flip, crops=a.crops,
                   num_crops=a.num_crops, crop_range=a.crop_range, draws=a.draws, seed=a.seed,
                   batch_size=a.batch_size, shard_size=a.shard_size)
    print(json.dumps({k: v for k, v in out.items() if k != "shards"}, indent=2))


def cmd_eval_tokenizer(a) -> None:
    from pathlib import Path

    from elmgen.data import DataConfig, load_dataset
    from elmgen.tokenizer import load_tokenizer
    from elmgen.train import tokenizer_report
    from elmgen.training import resolve_device
    from elmgen.vocab import Vocab

    tokenizer, meta = load_tokenizer(a.tokenizer, resolve_device(a.device))
    data = DataConfig(source=a.data or meta["data"]["source"], split=a.split, image_size=meta["image_size"],
                      channels=meta["channels"], limit=a.limit)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    report = tokenizer_report(tokenizer, load_dataset(data), out, Vocab.parse(a.vocab) if a.vocab else None)
    print_report({**report, "tokenizer": meta["path"]})


def cmd_train(a) -> None:
    from elmgen.codes import CodeDataset
    from elmgen.model import preset
    from elmgen.train import LMJob, train_lm
    from elmgen.training import is_main_process

    meta = CodeDataset(a.codes).meta
    model = {**preset(a.preset), "vocab": a.vocab or meta["vocab"], "grid_size": meta["grid"],
             "num_classes": meta["num_classes"], "kind": a.kind}
    job = build_config(LMJob, a.config, _train_overrides(a), model=model)
    rows = train_lm(job, a.codes, a.out, resume=a.resume)
    if rows and is_main_process():
        print(json.dumps(rows[-1]))


def _load_lm(a):
    """The LM of --model and its tokenizer (--tokenizer, or the one its codes came from), checked to match."""
    from elmgen.model import load_model
    from elmgen.sampling import check_compatible
    from elmgen.tokenizer import load_tokenizer
    from elmgen.training import resolve_device

    device = resolve_device(a.device)
    model, lm_meta = load_model(a.model, device, ema=not a.no_ema)
    tokenizer, tok_meta = load_tokenizer(a.tokenizer or lm_meta["codes"]["tokenizer"], device)
    check_compatible(lm_meta, tok_meta)
    return model, tokenizer, tok_meta


def _sample_config(a, model):
    """The sampling options, checked against the model before any work."""
    from elmgen.sampling import SampleConfig

    cfg = SampleConfig(cfg_scale=a.cfg_scale, cfg_schedule=a.cfg_schedule, cfg_power=a.cfg_power,
                        cfg_interval=a.cfg_interval, temperature=a.temperature, temperature_end=a.temperature_end,
                        top_k=a.top_k, top_p=a.top_p, seed=a.seed, kv_cache=not a.no_kv_cache, steps=a.steps,
                        mask_noise=a.mask_noise, compile=a.compile, precision=a.precision)
    cfg.validate(model.vocab_size)
    return cfg


def _class_labels(a, num_classes: int):
    """Labels and per-image seeds of --classes x --num-per-class (all classes by default)."""
    from elmgen.sampling import class_balanced, image_seeds

    classes = a.classes if a.classes is not None else list(range(num_classes))
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ElmgenError(f"classes {bad} are out of range: the model knows classes 0..{num_classes - 1}")
    labels, index_in_class = class_balanced(classes, a.num_per_class)
    return labels, image_seeds(a.seed, labels, index_in_class)


def cmd_sample(a) -> None:
    from elmgen.sampling import sample_images, write_samples

    model, tokenizer, _ = _load_lm(a)
    cfg = _sample_config(a, model)
    if not 0 <= a.rank < a.world_size:
        raise ElmgenError(f"--rank {a.rank} must be in [0, --world-size {a.world_size})")
    labels, seeds = _class_labels(a, model.cfg.num_classes)
    # Shard r of w takes every w-th image; seeds are per image, so shards never repeat one.
    labels, seeds = labels[a.rank::a.world_size], seeds[a.rank::a.world_size]
    images = sample_images(model, tokenizer, labels, seeds, cfg, batch_size=a.batch_size)
    name = "samples" if a.world_size == 1 else f"samples_rank{a.rank:05d}"
    png, npz = write_samples(images, labels, seeds, a.out, ncols=a.num_per_class, name=name)
    print(json.dumps({"png": str(png), "npz": str(npz), "images": len(labels), **to_dict(cfg)}))


def cmd_outpaint(a) -> None:
    from elmgen.sampling import outpaint_images, write_samples

    model, tokenizer, _ = _load_lm(a)
    cfg, g = _sample_config(a, model), model.cfg.grid_size
    height, width, stride = a.height or g, a.width or 2 * g, a.stride or max(1, g // 2)  # 0 is refused by the parser
    labels, seeds = _class_labels(a, model.cfg.num_classes)
    images = outpaint_images(model, tokenizer, labels, seeds, cfg, height, width, stride)
    png, npz = write_samples(images, labels, seeds, a.out, ncols=a.num_per_class, name="outpaint")
    print(json.dumps({"png": str(png), "npz": str(npz), "images": len(labels), "grid": [height, width],
                      "image_size": list(images.shape[-2:])}))


def cmd_inpaint(a) -> None:
    import torch

    from elmgen.data import DataConfig, load_dataset
    from elmgen.plots import image_grid, save_png
    from elmgen.sampling import image_seeds, inpaint_images

    model, tokenizer, tok_meta = _load_lm(a)
    cfg = _sample_config(a, model)
    data = load_dataset(DataConfig(source=a.data or tok_meta["data"]["source"], split=a.split,
                                   image_size=tok_meta["image_size"], channels=tok_meta["channels"]))
    bad = [i for i in a.indices if not 0 <= i < len(data)]
    if bad:
        raise ElmgenError(f"image indices {bad} are out of range: the {a.split} split has {len(data)} images")
    images, labels = data.images(a.indices), torch.as_tensor(data.labels[a.indices])
    seeds = image_seeds(a.seed, labels, torch.arange(len(labels)))
    result, blanked = inpaint_images(model, tokenizer, images, labels, tuple(a.region), cfg, seeds)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = torch.stack([images, blanked, result], 1).flatten(0, 1)  # per image: original, input, result
    save_png(image_grid(rows, ncols=3, scale=2), out / "inpaint.png")
    print(json.dumps({"png": str(out / "inpaint.png"), "images": len(labels), "region": a.region}))


def cmd_model_info(a) -> None:
    from elmgen.model import ModelConfig, count_params, flops_per_token, preset, training_memory_gb

    cfg = build_config(ModelConfig, None, a.overrides, **preset(a.preset), vocab=a.vocab, grid_size=a.grid,
                       num_classes=a.num_classes)
    cfg.validate()
    memory = {
        f"{mode}": round(training_memory_gb(cfg, a.batch_per_gpu, a.gpus, sharded=mode.startswith("fsdp"),
                                            activation_checkpointing=mode.endswith("ckpt")), 2)
        for mode in ("ddp", "ddp_ckpt", "fsdp", "fsdp_ckpt")
    }
    info = {"preset": a.preset, "params": count_params(cfg), "n_layer": cfg.n_layer, "d_model": cfg.d_model,
            "n_head": cfg.n_head, "vocab": cfg.vocab, "grid_size": cfg.grid_size, "num_classes": cfg.num_classes,
            "kind": cfg.kind, "mlp_hidden": cfg.mlp_hidden, "flops_per_token": flops_per_token(cfg),
            "batch_per_gpu": a.batch_per_gpu, "gpus": a.gpus, "memory_gb_per_gpu": memory}
    if a.json:
        print(json.dumps(info))
    else:
        for k, v in info.items():
            print(f"{k:>18}: {v:,}" if isinstance(v, int) else f"{k:>18}: {v}")


def cmd_run(a) -> None:
    from elmgen.demo import run_demo
    from elmgen.pipeline import PipelineConfig, folder_config

    base = {}
    if a.data:
        base, note = folder_config(a.data, a.image_size)
        print(f"elmgen run: {note}", file=sys.stderr)
    elif a.image_size:
        raise ElmgenError("--image-size applies to --data DIR (Fashion-MNIST runs at 32 px)")
    cfg = build_config(PipelineConfig, a.config, a.overrides, **base)
    if a.minutes:
        cfg = replace(cfg, minutes=a.minutes)
    if a.quick:
        cfg = quick_demo(cfg)
    metrics = run_demo(cfg, a.out)
    print(json.dumps(metrics, indent=2))
    print(f"wrote {a.out}/report.md, samples.png, samples.npz, reconstructions.png, loss.png, metrics.json")


def cmd_shapes(a) -> None:
    from elmgen.shapes import make_shapes

    out = make_shapes(a.out, a.classes, a.per_class, a.size, a.seed)
    print(f"wrote {a.classes * a.per_class} images to {out}/<shape>/")


def cmd_sweep(a) -> None:
    from elmgen.sweep import SweepConfig, run_sweep

    rows = run_sweep(build_config(SweepConfig, a.config, a.overrides), a.out)
    print(f"{len(rows)} runs; wrote {a.out}/summary.md, summary.csv and plots")


def quick_demo(cfg):
    """A minutes-long smoke run of the same pipeline on a data subset (looks worse, proves the wiring)."""
    tok, lm, clf = cfg.tokenizer, cfg.lm, cfg.classifier
    return replace(
        cfg,
        tokenizer=replace(tok, data=replace(tok.data, limit=2000), eval_images=200,
                          train=replace(tok.train, steps=60, warmup_steps=10, save_every=60)),
        lm=replace(lm, train=replace(lm.train, steps=40, warmup_steps=5, save_every=40)),
        classifier=replace(clf, train=replace(clf.train, steps=40, warmup_steps=5, save_every=40)),
        num_per_class=2,
        reference_images=500,
    )


def cmd_train_classifier(a) -> None:
    from elmgen.classifier import ClassifierJob, train_classifier

    base = {"data": {"source": a.data}} if a.data else {}
    job = build_config(ClassifierJob, a.config, _train_overrides(a), **base)
    print(json.dumps(train_classifier(job, a.out, resume=a.resume), indent=2))


REF_HELP = "reference: 'fashion-mnist', a folder with one sub-folder per class, or an .npz of images (arr_0 uint8 NHWC)"


def _feature_args(s: argparse.ArgumentParser, ref_help: str) -> None:
    s.add_argument("--ref", required=True, help=ref_help)
    s.add_argument("--split", default="train", help="split of a reference data set (default: train)")
    s.add_argument("--limit", type=positive_int, help="use only the first N images of a reference data set")
    s.add_argument("--backend", choices=["classifier", "inception"], default="classifier",
                   help="feature space: 'classifier' (a run of 'elmgen train-classifier', offline; default) or "
                        "'inception' (the standard FID Inception-v3 from a local weights file; needs "
                        "elmgen[inception])")
    s.add_argument("--classifier", help="classifier run folder or checkpoint, for --backend classifier")
    s.add_argument("--inception-weights", metavar="FILE",
                   help="FID Inception weights file for --backend inception (default: $ELMGEN_INCEPTION_WEIGHTS)")
    s.add_argument("--k", type=positive_int, default=3,
                   help="neighbourhood size of the precision/recall manifolds (default 3)")
    s.add_argument("--batch-size", type=positive_int, default=250)
    s.add_argument("--device", default="auto")


def _extractor_and_reference(a):
    from elmgen.data import DataConfig
    from elmgen.evaluation import load_extractor
    from elmgen.training import resolve_device

    extractor = load_extractor(a.backend, a.classifier, a.inception_weights, resolve_device(a.device))
    ref = a.ref if a.ref.endswith(".npz") else DataConfig(source=a.ref, split=a.split, limit=a.limit)
    return extractor, ref


def cmd_eval(a) -> None:
    from elmgen.checkpoint import atomic_write_text
    from elmgen.evaluation import evaluate_samples

    extractor, ref = _extractor_and_reference(a)
    text = json.dumps(evaluate_samples(a.samples, ref, extractor, a.k, a.splits, a.batch_size), indent=2)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(a.out), text + "\n")
    print(text)


def cmd_ref_stats(a) -> None:
    from elmgen.evaluation import is_stats_file, open_reference, save_ref_stats

    if is_stats_file(a.ref):
        raise ElmgenError(f"{a.ref} already holds statistics; pass images or a data set as --ref")
    extractor, ref = _extractor_and_reference(a)
    stats = open_reference(ref, extractor, a.batch_size, a.k)
    path = save_ref_stats(stats, a.out)
    print(json.dumps({"out": str(path), "count": stats.count, "source": stats.source, "k": stats.k,
                      "feature_space": stats.feature_space}, indent=2))


def cmd_check_data(a) -> None:
    from elmgen.data import check_images, folder_images

    bad = check_images(a.folder, a.workers)
    for path, reason in bad:
        print(f"{path}: {reason}")
    summary = f"{len(folder_images(a.folder)[0])} files checked, {len(bad)} bad"
    if bad:
        raise ElmgenError(f"{summary}; remove or replace the files listed above")
    print(summary)


def cmd_analyze_randomness(a) -> None:
    from elmgen.analysis import analyze_randomness, randomness_markdown

    rows = analyze_randomness(a.out, a.codes or (), a.text or (), a.bpe_vocab, a.limit)
    print(randomness_markdown(rows))
    print(f"wrote {a.out}/randomness.json, randomness.md and randomness.png")


def cmd_analyze_attention(a) -> None:
    from elmgen.analysis import AttentionConfig, analyze_attention

    cfg = AttentionConfig(num_sequences=a.num_sequences, sampled=a.sampled, codes=a.codes, mask_ratio=a.mask_ratio,
                          queries=a.query or [], global_radius=a.global_radius, batch_size=a.batch_size, seed=a.seed)
    result = analyze_attention(a.model, a.out, cfg)
    keys = ("mean_distance", f"within_r{cfg.radii[0]}", "global_share", "cls_share")
    for name, rep in result["models"].items():
        print(f"{name} ({rep['params']:,} params; uniform attention: "
              + ", ".join(f"{k} {rep['uniform'][k]:.3f}" for k in keys) + ")")
        for layer in rep["layers"]:
            print(f"  layer {layer['layer']}: " + ", ".join(f"{k} {layer[k]:.3f}" for k in keys))
    print(f"wrote {a.out}/attention.json, attention-depth.png and a heat-map PNG per model")


def cmd_analyze_loss(a) -> None:
    from elmgen.analysis import analyze_loss

    for name, r in analyze_loss(a.runs, a.out).items():
        print(json.dumps({"run": name, **{k: r[k] for k in ("vocab", "params", "final_step", "final_loss",
                                                             "ln_vocab", "final_loss_norm")}}))
    print(f"wrote {a.out}/loss.json and loss.png")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="elmgen",
        description="Language models for image generation: binary tokenizers, factorized vocabularies and "
                    "autoregressive transformers (ELM, arXiv 2410.16257).",
    )
    p.add_argument("--version", action="version", version=f"elmgen {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("train-tokenizer", help="train a tokenizer (BAE, VQ or FSQ) on images",
                       description="Train a tokenizer (tokenizer.quantizer=bae|vq|fsq); writes checkpoints (with EMA "
                                   "weights), metrics.jsonl, loss.png, eval.json (PSNR, SSIM, code usage) and "
                                   "reconstructions.png.")
    s.add_argument("--out", type=out_folder, required=True, help="run folder to write")
    s.add_argument("--data", help="'fashion-mnist' (default) or a folder with one sub-folder per class")
    s.add_argument("--gan", action="store_true",
                   help="add the hinge PatchGAN discriminator from step loss.gan_start (sets loss.gan=true)")
    s.add_argument("--perceptual-weights", metavar="FILE",
                   help="VGG16 + LPIPS weights file: adds the perceptual loss (see docs/tokenizers.md)")
    _train_options(s)
    _common(s, "YAML with data/tokenizer/train/loss sections (see configs/tokenizer-*.yaml)")
    s.set_defaults(func=cmd_train_tokenizer)

    s = sub.add_parser("eval-tokenizer", help="reconstruction quality and code usage of a tokenizer",
                       description="PSNR, SSIM, code usage (of the code space, of each sub-code vocabulary, per "
                                   "bit) and codebook perplexity on held-out images; writes eval.json and "
                                   "reconstructions.png to --out and prints the JSON.")
    s.add_argument("--tokenizer", required=True, help="tokenizer run folder or checkpoint")
    s.add_argument("--out", type=out_folder, required=True, help="folder for eval.json and reconstructions.png")
    s.add_argument("--data", help="data source (default: the one the tokenizer was trained on)")
    s.add_argument("--split", default="test", help="train or test (default: test)")
    s.add_argument("--limit", type=positive_int, help="evaluate only the first N images")
    s.add_argument("--vocab", help="sub-code split N-C for the usage figures (default: 2-K/2 for BAE, 1-K else)")
    s.add_argument("--device", default="auto")
    s.set_defaults(func=cmd_eval_tokenizer)

    s = sub.add_parser("tokenize", help="encode a dataset into a code folder once",
                       description="Encode images (and augmented views) with a trained tokenizer into sharded, "
                                   "memory-mapped code files + labels.npy + meta.json. LM training reads these and "
                                   "never runs the encoder. An interrupted run resumes when re-run.")
    s.add_argument("--tokenizer", required=True, help="tokenizer run folder or checkpoint")
    s.add_argument("--out", type=out_folder, required=True, help="code folder to write")
    s.add_argument("--data", help="data source (default: the one the tokenizer was trained on)")
    s.add_argument("--split", default="train", help="train or test (default: train)")
    s.add_argument("--vocab", help="default vocabulary split N-C with N*C = K (default: 2-K/2 for BAE, 1-K else)")
    s.add_argument("--flip", action="store_true", help="also store codes of horizontally flipped images")
    s.add_argument("--crops", default="none", choices=["none", "five", "random"],
                   help="five: four corners + centre (with --flip: LlamaGen's ten-crop); random: --num-crops each")
    s.add_argument("--num-crops", type=positive_int, default=1, help="random crops per image")
    s.add_argument("--crop-range", type=float, default=1.0,
                   help="crops are cut from images enlarged by this factor (LlamaGen: 1.1); 1 without crops")
    s.add_argument("--draws", type=nonneg_int, default=0,
                   help="BAE: store N Bernoulli draws of every view (0: deterministic codes)")
    s.add_argument("--seed", type=nonneg_int, default=0, help="seed of random crops and draws")
    s.add_argument("--limit", type=positive_int, help="encode only the first N images")
    s.add_argument("--batch-size", type=positive_int, default=256)
    s.add_argument("--shard-size", type=positive_int, default=8192, help="images per code shard (the unit of resuming)")
    s.set_defaults(func=cmd_tokenize)

    s = sub.add_parser("train", help="train the AR or masked transformer on a code folder",
                       description="Train a class-conditional AR or MLM transformer on pre-tokenized codes; writes "
                                   "checkpoints (safetensors + JSON), metrics.jsonl and loss.png.")
    s.add_argument("--codes", required=True, help="code folder written by 'elmgen tokenize'")
    s.add_argument("--out", type=out_folder, required=True, help="run folder to write")
    s.add_argument("--preset", default="tiny", help="model size: micro, tiny, small, B, L, XL, XXL, 2B")
    s.add_argument("--kind", default="ar", choices=["ar", "mlm"],
                   help="ar: autoregressive, raster order; mlm: masked model with MaskGIT decoding")
    s.add_argument("--vocab", help="vocabulary split N-C (default: the code folder's)")
    _train_options(s)
    _common(s, "YAML with model/train sections (see configs/lm-*.yaml)")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="generate class-conditional images",
                       description="Sample images (AR: KV-cached decoding; MLM: MaskGIT) with classifier-free "
                                   "guidance; writes "
                                   "samples.png (one row per class) and samples.npz (ADM layout).")
    _lm_options(s, "LM")
    s.add_argument("--out", type=out_folder, required=True, help="folder for samples.png and samples.npz")
    s.add_argument("--num-per-class", type=positive_int, default=10)
    s.add_argument("--classes", type=int, nargs="+", help="class ids to sample (default: all)")
    s.add_argument("--batch-size", type=positive_int, default=100)
    _sampling_options(s)
    s.add_argument("--rank", type=nonneg_int, default=int(os.environ.get("RANK", 0)),
                   help="this shard's index (default: $RANK or 0); writes samples_rankNNNNN.npz")
    s.add_argument("--world-size", type=positive_int, default=int(os.environ.get("WORLD_SIZE", 1)),
                   help="number of shards (default: $WORLD_SIZE or 1)")
    s.set_defaults(func=cmd_sample)

    s = sub.add_parser("outpaint", help="generate images larger than the trained grid with an AR model",
                       description="Class-conditional outpainting: a trained-size window slides over a larger "
                                   "grid of cells (--stride cells at a time, raster order), the AR model sampling "
                                   "each new cell given the cells already generated in its window; writes "
                                   "outpaint.png (one row per class) and outpaint.npz.")
    _lm_options(s, "AR")
    s.add_argument("--out", type=out_folder, required=True, help="folder for outpaint.png and outpaint.npz")
    s.add_argument("--height", type=positive_int, help="grid cells high (default: the trained grid)")
    s.add_argument("--width", type=positive_int, help="grid cells wide (default: twice the trained grid)")
    s.add_argument("--stride", type=positive_int,
                   help="cells the window moves each time (default: half the trained grid)")
    s.add_argument("--num-per-class", type=positive_int, default=4)
    s.add_argument("--classes", type=int, nargs="+", help="class ids to sample (default: all)")
    _sampling_options(s)
    s.set_defaults(func=cmd_outpaint)

    s = sub.add_parser("inpaint", help="regenerate a region of real images with a masked model",
                       description="Encode real images, mask a rectangle of grid cells and fill it with MaskGIT "
                                   "decoding (the other cells are kept exactly); writes inpaint.png with the "
                                   "original, the masked input and the result per row.")
    _lm_options(s, "MLM")
    s.add_argument("--out", type=out_folder, required=True, help="folder for inpaint.png")
    s.add_argument("--data", help="image source (default: the tokenizer's training data)")
    s.add_argument("--split", default="test")
    s.add_argument("--indices", type=int, nargs="+", default=[0, 1, 2, 3], help="images of the split to edit")
    s.add_argument("--region", type=int, nargs=4, required=True, metavar=("TOP", "LEFT", "HEIGHT", "WIDTH"),
                   help="rectangle of grid cells to regenerate")
    _sampling_options(s)
    s.set_defaults(func=cmd_inpaint)

    s = sub.add_parser("model-info", help="parameters, FLOPs per token and memory of a preset (no weights allocated)",
                       description="Parameter count (built on the meta device), training FLOPs per token and "
                                   "estimated memory per GPU under DDP / FSDP, with and without activation "
                                   "checkpointing. The formulas are in docs/scaling.md.")
    s.add_argument("preset", help="micro, tiny, small, B, L, XL, XXL or 2B")
    s.add_argument("--vocab", default="2-12", help="vocabulary split N-C (default 2-12)")
    s.add_argument("--grid", type=positive_int, default=16, help="token grid side (default 16: 256 px at f=16)")
    s.add_argument("--num-classes", type=positive_int, default=1000)
    s.add_argument("--batch-per-gpu", type=positive_int, default=32, help="for the memory estimate (default 32)")
    s.add_argument("--gpus", type=positive_int, default=8, help="for the sharded (FSDP) memory estimate (default 8)")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="model config overrides, e.g. n_layer=30")
    s.set_defaults(func=cmd_model_info)

    s = sub.add_parser("run", aliases=["demo"],
                       help="the whole pipeline on Fashion-MNIST or your images, with a report",
                       description="Train the BAE, tokenize, train an AR model (2-8 vocabulary), sample 10 "
                                   "images per class with CFG and evaluate them; writes report.md, samples.png, "
                                   "samples.npz, reconstructions.png, loss.png and metrics.json. Re-running resumes. "
                                   "With --data DIR: classes, class names, channels and image size come from the "
                                   "folder, and without a DIR/test folder a fixed 10% of each class is held out.")
    s.add_argument("--out", type=out_folder, default="demo", help="output folder (default: demo)")
    s.add_argument("--data", metavar="DIR", help="a folder with one sub-folder of images per class (default: "
                                                 "Fashion-MNIST); make one with 'elmgen shapes'")
    s.add_argument("--image-size", type=int, metavar="PX",
                   help="image side for --data: 32, 64, 128 or 256 (default: the largest the images support)")
    s.add_argument("--minutes", type=positive_float, metavar="N",
                   help="fit the training stages' step counts to about N minutes in all on this machine, measured "
                        "from each stage's first steps (the same as minutes=N; default: the configured steps)")
    s.add_argument("--quick", action="store_true", help="a short smoke run on a data subset")
    _common(s, "YAML with tokenizer/lm/sample sections (see configs/demo.yaml)")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("shapes", help="write a synthetic class folder of coloured shapes",
                       description="Coloured shapes on coloured backgrounds, one sub-folder per shape: the class is "
                                   "the shape, never the colour. A folder to try 'elmgen run --data' on.")
    s.add_argument("--out", type=out_folder, required=True, help="folder to write (new or empty)")
    s.add_argument("--classes", type=positive_int, default=4, help="number of shapes (2-6, default 4)")
    s.add_argument("--per-class", type=positive_int, default=1000, help="images per shape (default 1000)")
    s.add_argument("--size", type=positive_int, default=32, help="image side in px (default 32)")
    s.add_argument("--seed", type=nonneg_int, default=0)
    s.set_defaults(func=cmd_shapes)

    s = sub.add_parser("sweep", help="run a grid of pipeline runs sharing common stages",
                       description="Run every combination of the swept fields over a base pipeline config; "
                                   "shares tokenizers, code folders and models between runs, skips finished "
                                   "runs, writes summary.csv, summary.md and a plot per swept field.")
    s.add_argument("config", metavar="CONFIG.yaml", help="sweep file with base, grid and/or runs (configs/sweeps/)")
    s.add_argument("--out", type=out_folder, required=True, help="sweep folder (re-run to resume)")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. base.lm.train.steps=100")
    s.set_defaults(func=cmd_sweep)

    s = sub.add_parser("train-classifier", help="train the classifier that measures samples offline",
                       description="Train a small CNN classifier (the offline feature space of 'elmgen eval' and "
                                   "the judge of class accuracy); writes checkpoints, metrics.jsonl, job.yaml and "
                                   "eval.json (test accuracy, per-class accuracy, training time, weights fingerprint).")
    s.add_argument("--out", type=out_folder, required=True, help="run folder to write")
    s.add_argument("--data", help="'fashion-mnist' (default) or a folder with one sub-folder per class")
    _train_options(s)
    _common(s, "YAML with data/classifier/train sections")
    s.set_defaults(func=cmd_train_classifier)

    s = sub.add_parser("eval", help="FID, IS, precision/recall and class accuracy of samples",
                       description="Measure samples against a reference in a named feature space: FID, Inception "
                                   "Score, precision/recall (k-NN manifolds) and, for labelled samples and the "
                                   "classifier backend, class accuracy. Prints JSON that names the feature "
                                   "extractor, its fingerprint and the sample and reference counts.")
    s.add_argument("--samples", required=True, nargs="+",
                   help=".npz files (ADM layout: arr_0 uint8 NHWC, arr_1 labels; shards are read together), a "
                        "folder of .npz shards, or a folder of images (labelled when in sub-folders named 0, 1, ...)")
    _feature_args(s, REF_HELP + ", or an .npz of statistics from 'elmgen ref-stats'")
    s.add_argument("--splits", type=positive_int, default=10, help="splits of the Inception Score (default 10)")
    s.add_argument("--out", type=out_file, help="also write the JSON to this file")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("ref-stats", help="reference statistics for FID and precision/recall, computed once",
                       description="Compute the reference's feature mean and covariance (pytorch-fid fields mu, "
                                   "sigma) plus its features and k-NN radii for precision/recall; pass the file "
                                   "to 'elmgen eval --ref'.")
    s.add_argument("--out", type=out_file, required=True, help=".npz file to write")
    _feature_args(s, REF_HELP)
    s.set_defaults(func=cmd_ref_stats)

    s = sub.add_parser("check-data", help="decode every image of a class folder and list the bad ones",
                       description="Decode every image file of a class folder (and its train/ and test/ splits), "
                                   "in parallel, and list every file that does not decode and every class folder "
                                   "without images, with the reason; exits with status 2 if any is bad.")
    s.add_argument("folder", metavar="DIR", help="a folder with one sub-folder per class")
    s.add_argument("--workers", type=positive_int, help="decoding threads (default: one per available core)")
    s.set_defaults(func=cmd_check_data)

    s = sub.add_parser("analyze", help="the paper's analyses: token randomness, attention locality, loss curves",
                       description="Numbers and plots behind the paper's analyses (see docs/analysis.md).")
    analyses = s.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    s = analyses.add_parser("randomness", help="how random image tokens are, next to text",
                            description="Unigram and raster-neighbour statistics (KL from uniform, entropy, "
                                        "entropy given the left/upper neighbours, vocabulary usage) of code "
                                        "folders (each sub-code and the whole cell code) and of a text corpus as "
                                        "bytes and as BPE tokens; writes randomness.json, .md and .png.")
    s.add_argument("--out", type=out_folder, required=True, help="folder to write")
    s.add_argument("--codes", nargs="+", help="code folders written by 'elmgen tokenize'")
    s.add_argument("--text", nargs="+", help="text files, read as one corpus (e.g. /usr/share/games/fortunes/*)")
    s.add_argument("--bpe-vocab", type=int, default=4096, help="BPE vocabulary size trained on the text (4096)")
    s.add_argument("--limit", type=positive_int, help="use only the first N rows of each code folder")
    s.set_defaults(func=cmd_analyze_randomness)

    s = analyses.add_parser("attention", help="where a model's attention looks, per layer and head",
                            description="Attention probabilities of each layer and head, averaged over real or "
                                        "sampled sequences: mean attention distance (grid cells), share within "
                                        "radius 1 and 2, share on the class token, share beyond a global radius. "
                                        "Writes attention.json, attention-depth.png (all models) and "
                                        "attention-<model>.png (heat-maps of query cells per layer).")
    s.add_argument("--model", required=True, nargs="+", help="LM run folders or checkpoints")
    s.add_argument("--out", type=out_folder, required=True, help="folder to write")
    s.add_argument("--codes", help="code folder of the real sequences (default: the one each model was trained on)")
    s.add_argument("--sampled", action="store_true", help="analyse the models' own samples instead of real codes")
    s.add_argument("--num-sequences", type=int, default=64, help="sequences averaged over (64)")
    s.add_argument("--query", type=int, nargs=2, action="append", metavar=("ROW", "COL"),
                   help="a cell whose attention to draw (repeatable; default: the centre and one near the bottom)")
    s.add_argument("--global-radius", type=float, default=3.0, help="attention beyond this distance is global (3)")
    s.add_argument("--mask-ratio", type=float, default=0.5, help="MLM: share of the input cells masked (0.5)")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--seed", type=nonneg_int, default=0, help="picks the real rows, masks and sample seeds")
    s.set_defaults(func=cmd_analyze_attention)

    s = analyses.add_parser("loss", help="training-loss curves of several runs, normalised by ln(vocabulary)",
                            description="Loss / ln V over training for each LM run (V: one sub-code vocabulary, "
                                        "so 1 is a uniform guess) and the final loss against parameters; writes "
                                        "loss.json and loss.png.")
    s.add_argument("runs", nargs="+", metavar="RUN", help="LM run folders")
    s.add_argument("--out", type=out_folder, required=True, help="folder to write")
    s.set_defaults(func=cmd_analyze_loss)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse fills `overrides` from the first run of positionals only: take key=value items after options too
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.func(args)
    except ElmgenError as e:
        print(f"elmgen: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path the user gave cannot be read or written: permissions, a full disk, ...
        where = f"{e.filename}: " if e.filename else ""
        print(f"elmgen: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("elmgen: interrupted; re-run with --resume (demo: the same command) to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

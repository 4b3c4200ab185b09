"""The two trainers: the tokenizer (reconstruction) and the language model (next-cell prediction)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from elmgen import checkpoint
from elmgen.codes import CodeDataset
from elmgen.config import save_yaml, to_dict
from elmgen.data import DataConfig, load_dataset, to_float, to_uint8
from elmgen.errors import ElmgenError
from elmgen.evaluation import evaluate_tokenizer
from elmgen.model import ModelConfig, Transformer
from elmgen.plots import image_grid, loss_curve
from elmgen.sampling import masked_fraction
from elmgen.tokenizer import BinaryAutoencoder, TokenizerConfig
from elmgen.training import TrainConfig, batch_indices, fit, is_main_process, resolve_device
from elmgen.vocab import Vocab


@dataclass
class TokenizerJob:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=3000, batch_size=64, lr=1e-3,
                                                                    warmup_steps=100, weight_decay=0.0))
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    hflip: bool = False  # random horizontal flips of training images
    eval_images: int = 2000  # held-out images for the PSNR / code-usage report


@dataclass
class LMJob:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=4000, batch_size=64, lr=1e-3,
                                                                    warmup_steps=200))


def train_tokenizer(job: TokenizerJob, out_dir: str | Path, resume: bool = False) -> dict:
    """Train a binary autoencoder; writes checkpoints, metrics, loss.png, eval.json, reconstructions.png."""
    out_dir = Path(out_dir)
    dataset = load_dataset(job.data)
    job.tokenizer.in_channels = job.data.channels
    if job.data.image_size % job.tokenizer.downsample:
        raise ElmgenError(f"image size {job.data.image_size} is not divisible by the tokenizer's "
                          f"downsampling factor {job.tokenizer.downsample}")
    device = resolve_device(job.train.device)
    torch.manual_seed(job.train.seed)
    model = BinaryAutoencoder(job.tokenizer).to(device)
    ckpt_config = {
        "kind": "bae", "tokenizer": to_dict(job.tokenizer), "data": to_dict(job.data), "bits": model.code_bits,
        "image_size": job.data.image_size, "channels": job.data.channels,
        "grid": job.data.image_size // job.tokenizer.downsample, "class_names": dataset.class_names,
    }
    _write_job(out_dir, job)

    def step_fn(model, step):
        idx = batch_indices(step, job.train.batch_size, len(dataset), job.train.seed)
        x = to_float(dataset.images(idx)).to(device)
        if job.hflip:
            flip = torch.rand(x.shape[0], device=device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        recon, probs, _ = model(x)
        l1 = (recon.float() - x).abs().mean()
        l2 = (recon.float() - x).pow(2).mean()
        return job.l1_weight * l1 + job.l2_weight * l2, {"l1": l1.item(), "l2": l2.item()}

    rows = fit(model, job.train, out_dir, step_fn, ckpt_config, resume, desc="tokenizer",
               units_per_step=job.train.batch_size, unit="img")
    if not is_main_process():
        return {}
    loss_curve(rows, out_dir / "loss.png", title="tokenizer loss (L1 + L2)")
    held_out = load_dataset(replace(job.data, split="test", limit=job.eval_images))
    report = evaluate_tokenizer(model, held_out)
    report["dataset"] = held_out.name
    checkpoint.atomic_write_text(out_dir / "eval.json", json.dumps(report, indent=2))
    save_reconstructions(model, held_out, out_dir / "reconstructions.png")
    return report


@torch.no_grad()
def save_reconstructions(model: BinaryAutoencoder, dataset, path, n: int = 16) -> None:
    """Top row: originals; bottom row: reconstructions from deterministic codes."""
    device = next(model.parameters()).device
    x = to_float(dataset.images(list(range(min(n, len(dataset)))))).to(device)
    grid = x.shape[-1] // model.cfg.downsample
    recon = model.decode_cells(model.encode_cells(x), grid).clamp(-1, 1)
    image_grid(to_uint8(torch.cat([x, recon])), ncols=x.shape[0], scale=3).save(path)


def train_lm(job: LMJob, codes_dir: str | Path, out_dir: str | Path, resume: bool = False) -> list[dict]:
    """Train the AR or MLM transformer on a code folder; writes checkpoints, metrics.jsonl and loss.png."""
    out_dir = Path(out_dir)
    codes = CodeDataset(codes_dir)
    meta, cfg = codes.meta, job.model
    if cfg.grid_size != meta["grid"] or cfg.num_classes != meta["num_classes"]:
        raise ElmgenError(f"model.grid_size={cfg.grid_size} / model.num_classes={cfg.num_classes} do not match "
                          f"the code folder ({meta['grid']} / {meta['num_classes']}); drop those overrides")
    vocab = Vocab.for_bits(cfg.vocab, meta["bits"])
    device = resolve_device(job.train.device)
    torch.manual_seed(job.train.seed)
    model = Transformer(cfg).to(device)
    ckpt_config = {"kind": "lm", "model": to_dict(cfg), "codes": {**meta, "path": str(Path(codes_dir).resolve())}}
    _write_job(out_dir, job)
    B = job.train.batch_size

    def step_fn(model, step):
        sub_BLn, labels_B = codes.batch(batch_indices(step, B, len(codes), job.train.seed), vocab)
        sub_BLn, labels_B = sub_BLn.to(device), labels_B.to(device)
        loss_fn = mlm_loss if cfg.kind == "mlm" else ar_loss
        return loss_fn(model, labels_B, sub_BLn), {}

    rows = fit(model, job.train, out_dir, step_fn, ckpt_config, resume, desc=cfg.kind.upper(),
               units_per_step=B * cfg.num_cells, unit="tok")
    if is_main_process():
        loss_curve(rows, out_dir / "loss.png", title=f"{cfg.kind.upper()} loss, vocabulary {vocab}",
                   hline=float(torch.log(torch.tensor(float(vocab.size)))), hline_label=f"ln {vocab.size} (uniform)")
    return rows


def ar_loss(model: Transformer, labels_B: torch.Tensor, sub_BLn: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over (cell, sub-code) of next-cell prediction."""
    logits = model(labels_B, sub_BLn[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 2), sub_BLn.flatten())


def mlm_loss(model: Transformer, labels_B: torch.Tensor, sub_BLn: torch.Tensor) -> torch.Tensor:
    """Mask a cosine-schedule share of each sequence's cells (all sub-codes of a cell together);
    mean cross-entropy over the masked (cell, sub-code) pairs."""
    B, L, _ = sub_BLn.shape
    ratio_B = masked_fraction(torch.rand(B)).float().to(sub_BLn.device)
    num_masked_B = (ratio_B * L).ceil().clamp(1, L)
    rank_BL = torch.rand(B, L, device=sub_BLn.device).argsort(-1).argsort(-1)  # a random order of the cells
    masked_BL = rank_BL < num_masked_B[:, None]
    x = sub_BLn.masked_fill(masked_BL[..., None], model.mask_index)
    logits = model(labels_B, x)[:, 1:]
    return F.cross_entropy(logits[masked_BL].float().flatten(0, 1), sub_BLn[masked_BL].flatten())


def _write_job(out_dir: Path, job) -> None:
    if is_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(job, out_dir / "job.yaml")

"""The two trainers: the tokenizer (reconstruction) and the language model (next-cell prediction)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from elmgen import checkpoint
from elmgen.codes import CodeDataset
from elmgen.config import to_dict
from elmgen.data import DataConfig, absolute_source, load_dataset, to_float, to_uint8
from elmgen.errors import ElmgenError
from elmgen.evaluation import evaluate_tokenizer
from elmgen.losses import (
    LossConfig,
    PatchDiscriminator,
    PerceptualLoss,
    adaptive_weight,
    hinge_d_loss,
    load_perceptual,
)
from elmgen.model import ModelConfig, Transformer
from elmgen.model import training_memory_gb as lm_memory_gb
from elmgen.plots import image_grid, loss_curve, save_png
from elmgen.sampling import masked_fraction
from elmgen.tokenizer import Autoencoder, TokenizerConfig, load_tokenizer
from elmgen.tokenizer import training_memory_gb as tokenizer_memory_gb
from elmgen.training import TrainConfig, check_training_memory, fit, is_main_process, resolve_device
from elmgen.vocab import Vocab


@dataclass
class TokenizerJob:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=3000, batch_size=64, lr=1e-3,
                                                                    warmup_steps=100, weight_decay=0.0,
                                                                    ema_decay=0.999))
    loss: LossConfig = field(default_factory=LossConfig)
    hflip: bool = False  # random horizontal flips of training images
    eval_images: int = 2000  # held-out images for the PSNR / SSIM / code-usage report


@dataclass
class LMJob:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=4000, batch_size=64, lr=1e-3,
                                                                    warmup_steps=200, ema_decay=0.9999))


class TokenizerTraining(nn.Module):
    """What a tokenizer checkpoint holds: the tokenizer and the discriminator.

    The shared loop's one optimizer trains both: the generator term reaches only the tokenizer and the
    discriminator term only the discriminator (see `tokenizer_step`), so both optimizer states travel
    in the checkpoint and a resumed run is exact. The loop's EMA (train.ema_decay) covers both; only
    the tokenizer's part is used.
    """

    def __init__(self, job: TokenizerJob):
        super().__init__()
        self.tokenizer = Autoencoder(job.tokenizer)
        self.discriminator = PatchDiscriminator(job.tokenizer.in_channels) if job.loss.gan else None

    def compile(self, **kwargs) -> None:  # no forward of its own: compile the parts the step calls
        self.tokenizer.compile(**kwargs)
        if self.discriminator is not None:
            self.discriminator.compile(**kwargs)


def tokenizer_step(trainer: TokenizerTraining, x: torch.Tensor, step: int, loss_cfg: LossConfig,
                   perceptual: PerceptualLoss | None) -> tuple[torch.Tensor, dict]:
    """The full objective on one batch: L1 + L2 (+ perceptual) + the quantizer's loss, and from
    loss_cfg.gan_start the adaptive-weighted hinge GAN terms of generator and discriminator."""
    recon, q = trainer.tokenizer(x)
    recon = recon.float()
    l1, l2 = (recon - x).abs().mean(), (recon - x).pow(2).mean()
    rec = loss_cfg.l1 * l1 + loss_cfg.l2 * l2
    logs = {"l1": l1.item(), "l2": l2.item()}
    if perceptual is not None:
        p = perceptual(recon, x).mean()
        rec = rec + loss_cfg.perceptual * p
        logs["perceptual"] = p.item()
    loss = rec + q.loss
    if q.loss.requires_grad:
        logs["quantizer"] = q.loss.item()
    disc = trainer.discriminator
    if disc is not None and step >= loss_cfg.gan_start:
        disc.requires_grad_(False)  # the generator term must not train the discriminator
        gen = -disc(recon).float().mean()
        disc.requires_grad_(True)
        weight = loss_cfg.gan_weight * adaptive_weight(rec, gen, trainer.tokenizer.last_layer)
        d_loss = hinge_d_loss(disc(x).float(), disc(recon.detach()).float())  # reaches only the discriminator
        loss = loss + weight * gen + d_loss
        logs.update(gen=gen.item(), disc=d_loss.item(), gan_weight=weight.item())
    return loss, logs


def train_tokenizer(job: TokenizerJob, out_dir: str | Path, resume: bool = False) -> dict:
    """Train a tokenizer; writes checkpoints, metrics, loss.png, eval.json and reconstructions.png."""
    out_dir = Path(out_dir)
    job.loss.validate()
    dataset = load_dataset(job.data)
    job.tokenizer.in_channels = job.data.channels
    check_training_memory(job.train, lambda batch: tokenizer_memory_gb(job.tokenizer, job.data.image_size, batch),
                          f"training a tokenizer on {job.data.image_size} px images",
                          "lower data.image_size or train.batch_size, or raise --grad-accum")
    if job.data.image_size % job.tokenizer.downsample:
        raise ElmgenError(f"image size {job.data.image_size} is not divisible by the tokenizer's "
                          f"downsampling factor {job.tokenizer.downsample}")
    perceptual = load_perceptual(job.loss.perceptual_weights) if job.loss.perceptual_weights else None
    device = resolve_device(job.train.device)
    torch.manual_seed(job.train.seed)
    trainer = TokenizerTraining(job).to(device)
    if trainer.discriminator is not None and job.data.image_size < trainer.discriminator.min_image_size():
        raise ElmgenError(f"the PatchGAN discriminator needs images of at least "
                          f"{trainer.discriminator.min_image_size()} px, not {job.data.image_size}; drop --gan")
    if perceptual is not None:
        perceptual.to(device)
    model = trainer.tokenizer
    ckpt_config = {
        "kind": job.tokenizer.quantizer, "tokenizer": to_dict(job.tokenizer),
        "data": to_dict(absolute_source(job.data)),
        "bits": model.code_bits, "num_codes": model.num_codes, "image_size": job.data.image_size,
        "channels": job.data.channels, "grid": job.data.image_size // job.tokenizer.downsample,
        "class_names": dataset.class_names,
    }

    def step_fn(trainer, step, idx):
        x = to_float(dataset.images(idx)).to(device)
        if job.hflip:
            flip = torch.rand(x.shape[0], device=device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return tokenizer_step(trainer, x, step, job.loss, perceptual)

    rows = fit(trainer, job.train, out_dir, step_fn, len(dataset), ckpt_config, resume,
               desc=f"tokenizer ({job.tokenizer.quantizer})", units_per_step=job.train.batch_size, unit="img",
               job=job)
    if not is_main_process():
        return {}
    loss_curve(rows, out_dir / "loss.png", title="tokenizer loss")
    held_out = load_dataset(replace(job.data, split="test", limit=job.eval_images))
    release, _ = load_tokenizer(out_dir, device)  # the weights saved for use (the EMA, if kept)
    return tokenizer_report(release, held_out, out_dir)


def tokenizer_report(model: Autoencoder, dataset, out_dir: Path, vocab: Vocab | None = None) -> dict:
    """Reconstruction quality and code usage on `dataset`: eval.json and reconstructions.png in `out_dir`."""
    report = evaluate_tokenizer(model, dataset, vocab=vocab)
    report["dataset"] = dataset.name
    save_reconstructions(model, dataset, out_dir / "reconstructions.png")
    # last: the pipeline takes eval.json as the sign that the tokenizer stage is complete
    checkpoint.atomic_write_text(out_dir / "eval.json", json.dumps(report, indent=2))
    return report


@torch.no_grad()
def save_reconstructions(model: Autoencoder, dataset, path, n: int = 16) -> None:
    """Top row: originals; bottom row: reconstructions from deterministic codes."""
    model.eval()
    device = next(model.parameters()).device
    x = to_float(dataset.images(list(range(min(n, len(dataset)))))).to(device)
    grid = x.shape[-1] // model.cfg.downsample
    recon = model.decode_cells(model.encode_cells(x), grid).clamp(-1, 1)
    save_png(image_grid(to_uint8(torch.cat([x, recon])), ncols=x.shape[0], scale=3), path)


def train_lm(job: LMJob, codes_dir: str | Path, out_dir: str | Path, resume: bool = False) -> list[dict]:
    """Train the AR or MLM transformer on a code folder; writes checkpoints, metrics.jsonl and loss.png."""
    out_dir = Path(out_dir)
    codes = CodeDataset(codes_dir)
    meta, cfg = codes.meta, job.model
    if cfg.grid_size != meta["grid"] or cfg.num_classes != meta["num_classes"]:
        raise ElmgenError(f"model.grid_size={cfg.grid_size} / model.num_classes={cfg.num_classes} do not match "
                          f"the code folder ({meta['grid']} / {meta['num_classes']}); drop those overrides")
    vocab = Vocab.for_bits(cfg.vocab, meta["bits"])
    num_codes = meta.get("num_codes")
    if cfg.num_codes is None and num_codes is not None and num_codes < 2 ** meta["bits"]:
        cfg.num_codes = num_codes  # the code folder's code space, unless the config states it
    if cfg.num_codes not in (None, num_codes):
        raise ElmgenError(f"model.num_codes={cfg.num_codes} does not match the code folder's {num_codes} codes")
    t, g = job.train, cfg.grid_size
    check_training_memory(t, lambda batch: lm_memory_gb(cfg, batch, ema=t.ema_decay > 0,
                                                        activation_checkpointing=t.activation_checkpointing),
                          f"training this LM on {g}x{g}-cell sequences", "lower train.batch_size, raise --grad-accum, "
                          "add --activation-checkpointing or use a smaller --preset")
    device = resolve_device(job.train.device)
    torch.manual_seed(job.train.seed)
    model = Transformer(cfg).to(device)
    ckpt_config = {"kind": "lm", "model": to_dict(cfg), "codes": {**meta, "path": str(Path(codes_dir).resolve())}}
    B = job.train.batch_size
    loss_fn = LOSSES[cfg.kind]

    def step_fn(model, step, idx):
        sub_BLn, labels_B = codes.batch(idx, vocab, epoch=step * B // len(codes))  # a new Bernoulli draw each epoch
        sub_BLn, labels_B = sub_BLn.to(device), labels_B.to(device)
        return loss_fn(model, labels_B, sub_BLn), {}

    rows = fit(model, job.train, out_dir, step_fn, len(codes), ckpt_config, resume, desc=cfg.kind.upper(),
               units_per_step=B * cfg.num_cells, unit="tok", job=job)
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


LOSSES = {"ar": ar_loss, "mlm": mlm_loss}  # the training loss of each model kind

"""The tokenizer trainer: reconstruction (L1, L2, perceptual), the quantizer's own loss and, from a set step,
the PatchGAN with the adaptive weight; the held-out report at the end."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from elmgen.checkpoint import CheckpointMeta
from elmgen.config import to_dict
from elmgen.data import DataConfig, ImageDataset, absolute_source, load_dataset, random_hflip, to_float
from elmgen.data.loader import item_uniforms
from elmgen.device import resolve_device
from elmgen.errors import ElmgenError
from elmgen.evaluation.tokenizer import reconstruction_grid, tokenizer_report
from elmgen.plots import loss_curve
from elmgen.tokenizers import Autoencoder, TokenizerConfig, load_tokenizer, training_memory_gb
from elmgen.tokenizers.losses import (
    LossConfig,
    PatchDiscriminator,
    PerceptualLoss,
    adaptive_weight,
    edge_weights,
    hinge_d_loss,
    load_perceptual,
)
from elmgen.train.config import OptimizerConfig, TrainConfig
from elmgen.train.distributed import is_main_process
from elmgen.train.loop import Part, check_training_memory, fit

PREVIEW_IMAGES = 8  # training images reconstructed in TensorBoard at each checkpoint (train.log: tensorboard)


@dataclass
class TokenizerJob:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=3000, batch_size=64, lr=1e-3, warmup_steps=100, weight_decay=0.0, ema_decay=0.999
        )
    )
    loss: LossConfig = field(default_factory=LossConfig)
    # the discriminator's own AdamW, schedule (counted from loss.gan_start) and clip; VQGAN and LlamaGen train it
    # at the generator's rate
    discriminator: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-3, weight_decay=0.0))
    hflip: bool = False  # random horizontal flips of training images
    eval_images: int = 2000  # held-out images for the PSNR / SSIM / code-usage report

    @property
    def held_out(self) -> DataConfig:
        """The held-out images every held-out figure of this tokenizer uses (its report, the samples' ceiling)."""
        return replace(self.data, split="test", limit=self.eval_images)


class TokenizerTraining(nn.Module):
    """What a tokenizer checkpoint holds: the tokenizer and the discriminator.

    The two are trained as a GAN is: the tokenizer (the generator) by the loop's optimizer, the discriminator
    as a `Part`, from loss.gan_start, by its own (job.discriminator): each has its own AdamW, schedule, gradient
    clip and DDP wrapper, and the EMA (train.ema_decay) covers the tokenizer only. Both optimizer states travel
    in the checkpoint, so a resumed run is exact.
    """

    def __init__(self, job: TokenizerJob):
        super().__init__()
        self.tokenizer = Autoencoder(job.tokenizer)
        self.discriminator = PatchDiscriminator(job.tokenizer.in_channels) if job.loss.gan else None

    def compile(self, **kwargs) -> None:  # no forward of its own: compile the parts the step calls
        self.tokenizer.compile(**kwargs)
        if self.discriminator is not None:
            self.discriminator.compile(**kwargs)


def tokenizer_step(
    trainer: TokenizerTraining, x: torch.Tensor, step: int, loss_cfg: LossConfig, perceptual: PerceptualLoss | None
) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """The generator's objective on one batch: L1 + L2 (pixels beside an edge weighted by loss_cfg.edge_weight)
    (+ perceptual) + the quantizer's loss, and from loss_cfg.gan_start the adaptive-weighted hinge generator term
    (the discriminator frozen: it gets no gradient). Returns the loss, figures to log and the reconstructions (for
    `discriminator_step`)."""
    recon, q = trainer.tokenizer(x)
    recon = recon.float()
    err = recon - x
    l1, l2 = err.abs().mean(), err.pow(2).mean()
    logs = {"l1": l1.item(), "l2": l2.item()}  # unweighted: comparable across edge weights
    if loss_cfg.edge_weight > 0:
        w = edge_weights(x, loss_cfg.edge_weight)
        l1, l2 = (w * err.abs()).mean(), (w * err.pow(2)).mean()
    rec = loss_cfg.l1 * l1 + loss_cfg.l2 * l2
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
        loss = loss + weight * gen
        logs.update(gen=gen.item(), gan_weight=weight.item())
    return loss, logs, recon


def discriminator_step(disc: PatchDiscriminator, x: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The discriminator's hinge loss on real images and (detached: it reaches only the discriminator) their
    reconstructions."""
    d_loss = hinge_d_loss(disc(x).float(), disc(recon.detach()).float())
    return d_loss, {"disc": d_loss.item()}


def training_images(dataset: ImageDataset, hflip: bool, seed: int, step: int, idx: np.ndarray) -> torch.Tensor:
    """The uint8 images of one micro-batch, flipped at random with `hflip` (in the input pipeline's workers)."""
    x = dataset.images(idx)
    return random_hflip(x, item_uniforms(seed, step, idx, 1)[:, 0]) if hflip else x


def check_fits(job: TokenizerJob) -> None:
    """Refuse, before any work, a tokenizer job that would run out of memory or cannot divide its images."""
    check_training_memory(
        job.train,
        lambda batch: training_memory_gb(job.tokenizer, job.data.image_size, batch),
        f"training a tokenizer on {job.data.image_size} px images",
        "lower data.image_size or train.batch_size, or raise --grad-accum",
    )
    if job.data.image_size % job.tokenizer.downsample:
        raise ElmgenError(
            f"image size {job.data.image_size} is not divisible by the tokenizer's "
            f"downsampling factor {job.tokenizer.downsample}"
        )


def checkpoint_meta(job: TokenizerJob, model: Autoencoder, class_names: list[str]) -> CheckpointMeta:
    return CheckpointMeta(
        kind=job.tokenizer.quantizer,
        tokenizer=to_dict(job.tokenizer),
        data=to_dict(absolute_source(job.data)),
        bits=model.code_bits,
        num_codes=model.num_codes,
        image_size=job.data.image_size,
        channels=job.data.channels,
        grid=job.data.image_size // job.tokenizer.downsample,
        class_names=class_names,
    )


def train_tokenizer(job: TokenizerJob, out_dir: str | Path, resume: bool = False) -> dict:
    """Train a tokenizer; writes checkpoints, metrics, loss.png, eval.json and reconstructions.png."""
    out_dir = Path(out_dir)
    job.loss.validate()
    job.discriminator.validate_optimizer("discriminator")
    dataset = load_dataset(job.data)
    job.tokenizer.in_channels = job.data.channels
    check_fits(job)
    perceptual = load_perceptual(job.loss.perceptual_weights) if job.loss.perceptual_weights else None
    device = resolve_device(job.train.device)
    torch.manual_seed(job.train.seed)
    trainer = TokenizerTraining(job).to(device)
    if trainer.discriminator is not None and job.data.image_size < trainer.discriminator.min_image_size():
        raise ElmgenError(
            f"the PatchGAN discriminator needs images of at least "
            f"{trainer.discriminator.min_image_size()} px, not {job.data.image_size}; drop --gan"
        )
    if perceptual is not None:
        perceptual.to(device)
    meta = checkpoint_meta(job, trainer.tokenizer, dataset.class_names)

    seen = {}  # the generator's micro-batch: the discriminator's step that follows judges the same images

    def step_fn(trainer, step, images):
        x = to_float(images.to(device, non_blocking=True))
        loss, logs, recon = tokenizer_step(trainer, x, step, job.loss, perceptual)
        seen.update(x=x, recon=recon.detach())
        return loss, logs

    def disc_step_fn(trainer, step, images):  # `images` are those `seen` holds, ready on the device
        return discriminator_step(trainer.discriminator, seen["x"], seen["recon"])

    parts = (
        ()
        if trainer.discriminator is None
        else (Part("discriminator", job.discriminator, disc_step_fn, job.loss.gan_start),)
    )

    rows = fit(
        trainer,
        job.train,
        out_dir,
        step_fn,
        len(dataset),
        meta,
        resume,
        desc=f"tokenizer ({job.tokenizer.quantizer})",
        units_per_step=job.train.batch_size,
        unit="img",
        job=job,
        parts=parts,
        load=partial(training_images, dataset, job.hflip, job.train.seed),
        in_memory=dataset.in_memory,
        preview=lambda trainer: reconstruction_grid(trainer.tokenizer, dataset, PREVIEW_IMAGES),
    )
    if not is_main_process():
        return {}
    loss_curve(rows, out_dir / "loss.png", title="tokenizer loss")
    held_out = load_dataset(job.held_out)
    release, _ = load_tokenizer(out_dir, device)  # the weights saved for use (the EMA, if kept)
    return tokenizer_report(release, held_out, out_dir)

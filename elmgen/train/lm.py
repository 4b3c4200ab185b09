"""The language-model trainer: next-cell prediction (AR) or masked cells (MLM) over a code folder."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from elmgen.checkpoint import CheckpointMeta
from elmgen.codes import CodeDataset
from elmgen.config import to_dict
from elmgen.device import resolve_device
from elmgen.errors import ElmgenError
from elmgen.models import ModelConfig, Transformer, training_memory_gb
from elmgen.plots import image_grid, loss_curve
from elmgen.sampling.config import SampleConfig
from elmgen.sampling.generate import class_balanced, image_seeds, sample_images
from elmgen.schedules import masked_fraction
from elmgen.tokenizers import load_tokenizer
from elmgen.train.config import TrainConfig
from elmgen.train.distributed import is_main_process
from elmgen.train.loop import check_training_memory, fit
from elmgen.vocab import Vocab


@dataclass
class LMJob:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=4000, batch_size=64, lr=1e-3, warmup_steps=200, ema_decay=0.9999)
    )


def train_lm(job: LMJob, codes_dir: str | Path, out_dir: str | Path, resume: bool = False) -> list[dict]:
    """Train the AR or MLM transformer on a code folder; writes checkpoints, metrics.jsonl and loss.png."""
    out_dir = Path(out_dir)
    codes = CodeDataset(codes_dir)
    meta, cfg = codes.meta, job.model
    if cfg.grid_size != meta["grid"] or cfg.num_classes != meta["num_classes"]:
        raise ElmgenError(
            f"model.grid_size={cfg.grid_size} / model.num_classes={cfg.num_classes} do not match "
            f"the code folder ({meta['grid']} / {meta['num_classes']}); drop those overrides"
        )
    vocab = Vocab.for_bits(cfg.vocab, meta["bits"])
    num_codes = meta.get("num_codes")
    if cfg.num_codes is None and num_codes is not None and num_codes < 2 ** meta["bits"]:
        cfg.num_codes = num_codes  # the code folder's code space, unless the config states it
    if cfg.num_codes not in (None, num_codes):
        raise ElmgenError(f"model.num_codes={cfg.num_codes} does not match the code folder's {num_codes} codes")
    t, g = job.train, cfg.grid_size
    check_training_memory(
        t,
        lambda batch: training_memory_gb(
            cfg, batch, ema=t.ema_decay > 0, activation_checkpointing=t.activation_checkpointing
        ),
        f"training this LM on {g}x{g}-cell sequences",
        "lower train.batch_size, raise --grad-accum, add --activation-checkpointing or use a smaller --preset",
    )
    device = resolve_device(job.train.device)
    torch.manual_seed(job.train.seed)
    model = Transformer(cfg).to(device)
    ckpt_meta = CheckpointMeta(kind="lm", model=to_dict(cfg), codes={**meta, "path": str(Path(codes_dir).resolve())})
    B = job.train.batch_size
    loss_fn = LOSSES[cfg.kind]

    def step_fn(model, step, idx):
        sub_BLn, labels_B = codes.batch(idx, vocab, epoch=step * B // len(codes))  # a new Bernoulli draw each epoch
        sub_BLn, labels_B = sub_BLn.to(device), labels_B.to(device)
        return loss_fn(model, labels_B, sub_BLn), {}

    rows = fit(
        model,
        job.train,
        out_dir,
        step_fn,
        len(codes),
        ckpt_meta,
        resume,
        desc=cfg.kind.upper(),
        units_per_step=B * cfg.num_cells,
        unit="tok",
        job=job,
        preview=sample_grid(meta["tokenizer"], meta["num_classes"], device) if job.train.log == "tensorboard" else None,
    )
    if is_main_process():
        loss_curve(
            rows,
            out_dir / "loss.png",
            title=f"{cfg.kind.upper()} loss, vocabulary {vocab}",
            hline=float(torch.log(torch.tensor(float(vocab.size)))),
            hline_label=f"ln {vocab.size} (uniform)",
        )
    return rows


PREVIEW_CLASSES, PREVIEW_PER_CLASS = 10, 2  # the samples shown in TensorBoard at each checkpoint


def sample_grid(tokenizer_path: str, num_classes: int, device) -> Callable[[Transformer], Image.Image]:
    """A picture of the model's samples (default sampling settings, fixed seeds; a row per class) through the
    code folder's tokenizer."""
    with torch.random.fork_rng(devices=[]):  # building it draws initial weights: not from the run's RNG
        tokenizer, _ = load_tokenizer(tokenizer_path, device)
    labels, index = class_balanced(list(range(min(num_classes, PREVIEW_CLASSES))), PREVIEW_PER_CLASS)
    seeds = image_seeds(0, labels, index)
    return lambda model: image_grid(
        sample_images(model, tokenizer, labels, seeds, SampleConfig(), progress=False), PREVIEW_PER_CLASS, scale=2
    )


def ar_loss(model: Transformer, labels_B: torch.Tensor, sub_BLn: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over (cell, sub-code) of next-cell prediction."""
    return model(labels_B, sub_BLn[:, :-1], targets_BLn=sub_BLn)


def mlm_loss(model: Transformer, labels_B: torch.Tensor, sub_BLn: torch.Tensor) -> torch.Tensor:
    """Mask a cosine-schedule share of each sequence's cells (all sub-codes of a cell together);
    mean cross-entropy over the masked (cell, sub-code) pairs."""
    B, L, _ = sub_BLn.shape
    ratio_B = masked_fraction(torch.rand(B)).float().to(sub_BLn.device)
    num_masked_B = (ratio_B * L).ceil().clamp(1, L)
    rank_BL = torch.rand(B, L, device=sub_BLn.device).argsort(-1).argsort(-1)  # a random order of the cells
    masked_BL = rank_BL < num_masked_B[:, None]
    x = sub_BLn.masked_fill(masked_BL[..., None], model.mask_index)
    return model(labels_B, x, targets_BLn=sub_BLn, scored_BL=masked_BL)


LOSSES = {"ar": ar_loss, "mlm": mlm_loss}  # the training loss of each model kind

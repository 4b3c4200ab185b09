"""Class-conditional images from a trained LM and its tokenizer: per-image seeds, generation (AR or MaskGIT),
decoding to pixels, and the sample files (one, or one per process)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from elmgen.data import to_uint8
from elmgen.errors import ElmgenError
from elmgen.io import atomic_savez
from elmgen.models import Transformer
from elmgen.plots import image_grid, save_png
from elmgen.rng import item_seed
from elmgen.sampling.ar import OnStep, generate_ar
from elmgen.sampling.config import SampleConfig
from elmgen.sampling.maskgit import generate_mlm
from elmgen.tokenizers import Autoencoder
from elmgen.vocab import subcodes_to_cells


def generate(
    model: Transformer, labels_B: torch.Tensor, cfg: SampleConfig, seeds: list[int], on_step: OnStep | None = None
) -> torch.Tensor:
    """Class-conditional generation: labels (B,) -> sub-codes (B, L, n), one seed per image."""
    model.eval()
    return (generate_mlm if model.cfg.kind == "mlm" else generate_ar)(model, labels_B, cfg, seeds, on_step=on_step)


def check_classes(classes: list[int], num_classes: int) -> None:
    """Refuse classes outside 0..num_classes - 1 (the model's)."""
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ElmgenError(f"classes {bad} are out of range: the model knows classes 0..{num_classes - 1}")


def class_balanced(classes: list[int], num_per_class: int, num_classes: int | None = None):
    """Labels (N,) and each image's index within its class, class by class; with `num_classes` (the model's),
    classes it does not know are refused."""
    if num_classes is not None:
        check_classes(classes, num_classes)
    labels = torch.tensor(classes).repeat_interleave(num_per_class)
    return labels, torch.arange(num_per_class).repeat(len(classes))


def image_seeds(base_seed: int, labels_N: torch.Tensor, index_in_class_N: torch.Tensor) -> list[int]:
    """A distinct seed for the j-th image of class c: never repeated within a class, shard-independent."""
    return [item_seed(base_seed, c, j) for c, j in zip(labels_N.tolist(), index_in_class_N.tolist(), strict=True)]


@torch.no_grad()
def sample_images(
    model: Transformer,
    tokenizer: Autoencoder,
    labels: torch.Tensor,
    seeds: list[int],
    cfg: SampleConfig,
    batch_size: int = 100,
    progress: bool = True,
    on_step: OnStep | None = None,
) -> torch.Tensor:
    """Class labels (N,) and per-image seeds -> uint8 images (N, C, H, W); `on_step` sees each batch's steps."""
    device = next(model.parameters()).device
    out = []
    for start in tqdm(range(0, len(labels), batch_size), desc="sample", unit="batch", disable=not progress):
        batch = slice(start, start + batch_size)
        sub_BLn = generate(model, labels[batch].to(device), cfg, seeds[batch], on_step)
        out.append(decode_images(model, tokenizer, sub_BLn))
    return torch.cat(out)


@torch.no_grad()
def decode_images(model: Transformer, tokenizer: Autoencoder, sub_BLn: torch.Tensor) -> torch.Tensor:
    """The model's sub-codes (B, L, n) -> the tokenizer's uint8 images (B, C, H, W) on the CPU."""
    cells_BL = subcodes_to_cells(sub_BLn, model.cfg.vocabulary).to(next(tokenizer.parameters()).device)
    return to_uint8(tokenizer.decode_cells(cells_BL, model.cfg.grid_size)).cpu()


# Process r of w writes `name`.rank<r>-of-<w>.npz; zero-padded, so sorted file names are in rank order
SHARD_FILE = re.compile(r"(?P<name>.+)\.rank(?P<rank>\d{5})-of-(?P<world>\d{5})\.npz")


def shard_name(name: str, rank: int, world: int) -> str:
    """The file stem of process `rank`'s share of `world` (one process: `name` itself)."""
    return name if world == 1 else f"{name}.rank{rank:05d}-of-{world:05d}"


def share(count: int, rank: int, world: int) -> slice:
    """Process `rank`'s contiguous share of `count` items: the shares in rank order are all items, in order."""
    if world > count:
        raise ElmgenError(f"{world} processes for {count} images: start at most {count} processes")
    return slice(rank * count // world, (rank + 1) * count // world)


PREVIEW_ROWS, PREVIEW_COLS = 32, 16  # of the grid samples.png shows: 50k ImageNet samples would make a 40 GB image


def write_samples(
    images_NCHW: torch.Tensor, labels_N: torch.Tensor, seeds: list[int], out_dir, ncols: int, name: str = "samples"
) -> tuple[Path, Path]:
    """`name`.png (a grid, `ncols` images a row; its first PREVIEW_ROWS rows and PREVIEW_COLS columns) and an
    ADM-style `name`.npz of every image (arr_0 NHWC uint8, arr_1 labels, plus each image's seed)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png, npz = out_dir / f"{name}.png", out_dir / f"{name}.npz"
    index_N = torch.arange(len(images_NCHW))
    shown_N = (index_N // ncols < PREVIEW_ROWS) & (index_N % ncols < PREVIEW_COLS)
    save_png(image_grid(images_NCHW[shown_N], ncols=min(ncols, PREVIEW_COLS), scale=2), png)
    atomic_savez(npz, images_NCHW.permute(0, 2, 3, 1).numpy(), labels_N.numpy(), seeds=np.asarray(seeds, np.uint64))
    return png, npz

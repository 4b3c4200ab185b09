"""Editing with trained models: MLM inpainting of a region of real images, AR outpainting beyond the trained
grid with a sliding window."""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from elmgen.data import to_float, to_uint8
from elmgen.errors import ElmgenError
from elmgen.models import Transformer
from elmgen.sampling.ar import generate_ar
from elmgen.sampling.config import SampleConfig
from elmgen.sampling.generate import decode_images
from elmgen.sampling.maskgit import generate_mlm
from elmgen.tokenizers import Autoencoder
from elmgen.vocab import cells_to_subcodes, subcodes_to_cells

MAX_OUTPAINT_WINDOWS = 1024  # an outpainting canvas costs one full AR decode per window: bound it


def rectangle_hole(region: tuple[int, int, int, int], grid: int) -> torch.Tensor:
    """The cells of a rectangle (top, left, height, width) of a `grid` x `grid` grid, as a (grid, grid) bool mask."""
    top, left, height, width = region
    if not (0 <= top and 0 <= left and height > 0 and width > 0 and top + height <= grid and left + width <= grid):
        raise ElmgenError(f"region {region} (top left height width, in cells) must fit the {grid}x{grid} grid")
    hole_hw = torch.zeros(grid, grid, dtype=torch.bool)
    hole_hw[top : top + height, left : left + width] = True
    return hole_hw


@torch.no_grad()
def inpaint_images(
    model: Transformer,
    tokenizer: Autoencoder,
    images_BCHW: torch.Tensor,
    labels_B: torch.Tensor,
    hole_hw: torch.Tensor,
    cfg: SampleConfig,
    seeds: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Regenerate the grid cells marked in `hole_hw` (bool, grid x grid: any shape, e.g. `rectangle_hole`'s)
    of real uint8 images with the MLM, given all the others.

    Returns the inpainted images and the inputs with the hole blanked (for showing), both uint8.
    """
    if model.cfg.kind != "mlm":
        raise ElmgenError("inpainting needs a masked model (trained with --kind mlm)")
    g = model.cfg.grid_size
    if hole_hw.shape != (g, g) or not bool(hole_hw.any()):
        raise ElmgenError(f"mark at least one cell of the {g}x{g} grid to inpaint (got a {tuple(hole_hw.shape)} mask)")
    device = next(model.parameters()).device
    cells_BL = tokenizer.encode_cells(to_float(images_BCHW).to(next(tokenizer.parameters()).device))
    sub_BLn = cells_to_subcodes(cells_BL, model.cfg.vocabulary).to(device)
    known_BL = (~hole_hw.flatten()).expand(len(labels_B), -1)
    out_BLn = generate_mlm(model, labels_B.to(device), cfg, seeds, sub_BLn, known_BL)
    return decode_images(model, tokenizer, out_BLn), grey_cells(images_BCHW, ~known_BL)


def grey_cells(images_BCHW: torch.Tensor, cells_BL: torch.Tensor) -> torch.Tensor:
    """uint8 images with the pixels of the marked grid cells (raster order, a square grid) painted grey."""
    B, _, H, _ = images_BCHW.shape
    g = math.isqrt(cells_BL.shape[-1])
    f = H // g
    cells_B1HW = cells_BL.cpu().view(B, 1, g, g).repeat_interleave(f, 2).repeat_interleave(f, 3)
    return images_BCHW.masked_fill(cells_B1HW, 128)


def outpaint_grid(
    grid: int, height: int | None = None, width: int | None = None, stride: int | None = None
) -> tuple[int, int, int]:
    """An outpainting canvas (height, width, stride in cells) for a model of `grid` x `grid` cells, by default
    as high as the trained grid, twice as wide, the window moving half a grid at a time."""
    return height or grid, width or 2 * grid, stride or max(1, grid // 2)


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Offsets of windows of `window` cells that cover `size` cells, `stride` apart; the last one ends
    exactly at the edge."""
    starts = list(range(0, size - window, stride))
    return starts + [size - window]


@torch.no_grad()
def outpaint_ar(
    model: Transformer,
    labels_B: torch.Tensor,
    cfg: SampleConfig,
    seeds: list[int],
    height: int,
    width: int,
    stride: int,
) -> torch.Tensor:
    """Class-conditional images on a grid larger than the trained one: sub-codes (B, height*width, n).

    A trained-size window slides over the canvas in raster order, `stride` cells at a time; in each
    window the AR model is fed the cells generated so far (as in teacher forcing) and samples the rest,
    so every new cell sees the cells above and to its left within one window. The first window is
    exactly `generate_ar` with the same seeds.
    """
    g, n = model.cfg.grid_size, model.n_sub
    if height < g or width < g or not 1 <= stride <= g:
        raise ElmgenError(
            f"outpainting needs a grid of at least {g}x{g} cells (got {height}x{width}) and "
            f"a stride between 1 and {g} (got {stride})"
        )
    rows, cols = window_starts(height, g, stride), window_starts(width, g, stride)
    if len(rows) * len(cols) > MAX_OUTPAINT_WINDOWS:
        raise ElmgenError(
            f"outpainting {height}x{width} cells at stride {stride} takes {len(rows) * len(cols):,} "
            f"windows of {g}x{g} cells (each a full AR decode), more than {MAX_OUTPAINT_WINDOWS:,}; "
            "use a smaller --width/--height or a larger --stride"
        )
    model.eval()
    B, device = labels_B.shape[0], labels_B.device
    canvas_Bhwn = torch.zeros(B, height, width, n, dtype=torch.long, device=device)
    known_Bhw = torch.zeros(B, height, width, dtype=torch.bool, device=device)
    windows = [(r, c) for r in rows for c in cols]
    for i, (r, c) in enumerate(tqdm(windows, desc="outpaint", unit="window", leave=False)):
        known = known_Bhw[:, r : r + g, c : c + g].reshape(B, g * g)
        if bool(known.all()):
            continue
        window_seeds = seeds if i == 0 else [int(np.random.SeedSequence([s, i]).generate_state(1)[0]) for s in seeds]
        sub_BLn = canvas_Bhwn[:, r : r + g, c : c + g].reshape(B, g * g, n)
        out_BLn = generate_ar(model, labels_B, cfg, window_seeds, sub_BLn, known)
        canvas_Bhwn[:, r : r + g, c : c + g] = out_BLn.view(B, g, g, n)
        known_Bhw[:, r : r + g, c : c + g] = True
    return canvas_Bhwn.view(B, height * width, n)


@torch.no_grad()
def outpaint_images(
    model: Transformer,
    tokenizer: Autoencoder,
    labels: torch.Tensor,
    seeds: list[int],
    cfg: SampleConfig,
    height: int,
    width: int,
    stride: int,
) -> torch.Tensor:
    """Class labels (N,) -> uint8 images (N, C, height*f, width*f) from an AR model (see `outpaint_ar`)."""
    if model.cfg.kind != "ar":
        raise ElmgenError("outpainting needs an autoregressive model (trained with --kind ar)")
    device = next(model.parameters()).device
    sub_BLn = outpaint_ar(model, labels.to(device), cfg, seeds, height, width, stride)
    cells_BL = subcodes_to_cells(sub_BLn, model.cfg.vocabulary).to(next(tokenizer.parameters()).device)
    return to_uint8(tokenizer.decode_cells(cells_BL, height, width)).cpu()

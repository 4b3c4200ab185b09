"""Evaluation: reconstruction quality and code usage of tokenizers."""

from __future__ import annotations

import numpy as np
import torch

from elmgen.data import ImageDataset, to_float
from elmgen.vocab import Vocab, bits_to_cells, cells_to_subcodes


def psnr(x_BCHW: torch.Tensor, y_BCHW: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = (x_BCHW.float() - y_BCHW.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))


def code_usage(cells: np.ndarray, bits: int) -> dict:
    """Distinct K-bit codes seen, and that count over the most that could be seen."""
    distinct = int(np.unique(cells).size)
    possible = min(2**bits, int(cells.size))
    return {"distinct_codes": distinct, "code_usage": distinct / possible}


def subcode_usage(cells: np.ndarray, vocab: Vocab) -> list[float]:
    """Share of each sub-code vocabulary's entries that occur."""
    sub = cells_to_subcodes(torch.from_numpy(cells.reshape(-1)), vocab).numpy()
    return [np.unique(sub[:, j]).size / vocab.size for j in range(vocab.num_subcodes)]


def bit_stats(bits_NK: np.ndarray) -> dict:
    """Per-bit mean (0.5 is balanced) and the mean binary entropy in bits."""
    p = bits_NK.mean(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    return {"bit_mean": p.round(4).tolist(), "bit_entropy": float(np.nan_to_num(h).mean())}


@torch.no_grad()
def evaluate_tokenizer(model, dataset: ImageDataset, batch_size: int = 256, limit: int | None = None) -> dict:
    """PSNR of deterministic-code reconstructions, bit balance and code usage on `dataset`."""
    model.eval()
    device = next(model.parameters()).device
    n = len(dataset) if limit is None else min(limit, len(dataset))
    psnrs, cells, bits_rows = [], [], []
    for start in range(0, n, batch_size):
        x = to_float(dataset.images(np.arange(start, min(n, start + batch_size)))).to(device)
        bits_BKhw = model.encode(x)
        psnrs.append(psnr(model.decode(bits_BKhw).clamp(-1, 1), x).cpu())
        cells.append(bits_to_cells(bits_BKhw).cpu().numpy())
        bits_rows.append(bits_BKhw.permute(0, 2, 3, 1).reshape(-1, bits_BKhw.shape[1]).cpu().numpy())
    all_cells = np.concatenate(cells)
    K = model.cfg.num_bits
    return {
        "images": n,
        "psnr": float(torch.cat(psnrs).mean()),
        "bits": K,
        "grid": list(bits_BKhw.shape[-2:]),
        **code_usage(all_cells, K),
        **bit_stats(np.concatenate(bits_rows)),
    }

"""Evaluation: reconstruction quality and code usage of tokenizers."""

from __future__ import annotations

import numpy as np
import torch

from elmgen.data import ImageDataset, to_float
from elmgen.vocab import Vocab, cells_to_bits, cells_to_subcodes


def psnr(x_BCHW: torch.Tensor, y_BCHW: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = (x_BCHW.float() - y_BCHW.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))


def ssim(x_BCHW: torch.Tensor, y_BCHW: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM of images in [-1, 1] (Wang et al. 2004: Gaussian window, population statistics, mean
    over the valid positions and the channels; the window shrinks to fit small images)."""
    x, y = x_BCHW.float(), y_BCHW.float()
    C, win = x.shape[1], min(window, *x.shape[-2:])
    g = torch.exp(-((torch.arange(win, device=x.device) - (win - 1) / 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(C, 1, win, win)

    def blur(t):
        return torch.nn.functional.conv2d(t, kernel, groups=C)

    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y, cov = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2, blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2  # the usual constants for a data range of 2
    s = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


def code_usage(cells: np.ndarray, num_codes: int) -> dict:
    """Distinct codes seen, that count over the most that could be seen (the code space or the number of
    cells, whichever is smaller), and the perplexity exp(entropy) of the code histogram."""
    counts = np.unique(cells, return_counts=True)[1]
    p = counts / counts.sum()
    return {"distinct_codes": int(counts.size), "code_usage": counts.size / min(num_codes, int(cells.size)),
            "perplexity": float(np.exp(-(p * np.log(p)).sum()))}


def subcode_usage(cells: np.ndarray, vocab: Vocab) -> list[float]:
    """Share of each sub-code vocabulary's entries that occur."""
    sub = cells_to_subcodes(torch.from_numpy(cells.reshape(-1)), vocab).numpy()
    return [np.unique(sub[:, j]).size / vocab.size for j in range(vocab.num_subcodes)]


def bit_stats(bits_NK: np.ndarray) -> dict:
    """Per-bit mean (0.5 is balanced) and the mean binary entropy in bits."""
    p = bits_NK.mean(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    h = np.nan_to_num(h)
    return {"bit_mean": p.round(4).tolist(), "bit_entropy": float(h.mean()), "bit_entropies": h.round(4).tolist()}


@torch.no_grad()
def evaluate_tokenizer(model, dataset: ImageDataset, batch_size: int = 256, limit: int | None = None,
                       vocab: Vocab | None = None) -> dict:
    """PSNR and SSIM of reconstructions from deterministic codes, and code usage on `dataset`: of the
    code space (with perplexity), of each sub-code vocabulary of `vocab` (default: the tokenizer's), per bit."""
    model.eval()
    device = next(model.parameters()).device
    n = len(dataset) if limit is None else min(limit, len(dataset))
    K = model.code_bits
    vocab = Vocab.for_bits(str(vocab or model.default_vocab), K)
    psnrs, ssims, cells = [], [], []
    for start in range(0, n, batch_size):
        x = to_float(dataset.images(np.arange(start, min(n, start + batch_size)))).to(device)
        grid = x.shape[-1] // model.cfg.downsample
        cells_BL = model.encode_cells(x)
        recon = model.decode_cells(cells_BL, grid).clamp(-1, 1)
        psnrs.append(psnr(recon, x).cpu())
        ssims.append(ssim(recon, x).cpu())
        cells.append(cells_BL.cpu().numpy())
    all_cells = np.concatenate(cells)
    bits_NK = cells_to_bits(torch.from_numpy(all_cells.reshape(1, -1)), K, 1, all_cells.size).reshape(K, -1).T
    return {
        "images": n,
        "psnr": float(torch.cat(psnrs).mean()),
        "ssim": float(torch.cat(ssims).mean()),
        "quantizer": model.cfg.quantizer,
        "bits": K,
        "num_codes": model.num_codes,
        "grid": [grid, grid],
        **code_usage(all_cells, model.num_codes),
        "vocab": str(vocab),
        "subcode_usage": subcode_usage(all_cells, vocab),
        **bit_stats(bits_NK.numpy()),
    }

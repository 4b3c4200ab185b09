"""A tokenizer measured on held-out images: reconstruction quality, code usage, and a picture of both."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from elmgen.data import ImageDataset, to_float, to_uint8
from elmgen.evaluation.metrics import bit_stats, code_usage, psnr, ssim, subcode_usage
from elmgen.evaluation.sources import ImageSource, conform
from elmgen.io import atomic_write_text
from elmgen.plots import image_grid, save_png
from elmgen.tokenizers import Autoencoder
from elmgen.vocab import Vocab, cells_to_bits


@torch.no_grad()
def evaluate_tokenizer(
    model, dataset: ImageDataset, batch_size: int = 256, limit: int | None = None, vocab: Vocab | None = None
) -> dict:
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
    all_cells, psnr_N = np.concatenate(cells), torch.cat(psnrs).numpy()
    labels_N = np.asarray(dataset.labels[:n])
    bits_NK = cells_to_bits(torch.from_numpy(all_cells.reshape(1, -1)), K, 1, all_cells.size).reshape(K, -1).T
    return {
        "images": n,
        "psnr": float(psnr_N.mean()),
        # one per class (None for a class with no image here): a tokenizer can serve some classes worse
        "psnr_per_class": [
            float(psnr_N[labels_N == c].mean()) if (labels_N == c).any() else None
            for c in range(len(getattr(dataset, "class_names", ())) or labels_N.max(initial=-1) + 1)
        ],
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


def tokenizer_report(model: Autoencoder, dataset, out_dir: Path, vocab: Vocab | None = None) -> dict:
    """Reconstruction quality and code usage on `dataset`: eval.json and reconstructions.png in `out_dir`."""
    report = evaluate_tokenizer(model, dataset, vocab=vocab)
    report["dataset"] = dataset.name
    save_reconstructions(model, dataset, out_dir / "reconstructions.png")
    # last: the pipeline takes eval.json as the sign that the tokenizer stage is complete
    atomic_write_text(out_dir / "eval.json", json.dumps(report, indent=2))
    return report


@torch.no_grad()
def reconstruct(model: Autoencoder, x_BCHW: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] through deterministic codes and back."""
    model.eval()
    x_BCHW = x_BCHW.to(next(model.parameters()).device)
    return model.decode_cells(model.encode_cells(x_BCHW), x_BCHW.shape[-1] // model.cfg.downsample).clamp(-1, 1)


def reconstruction_grid(model: Autoencoder, dataset, n: int = 16) -> Image.Image:
    """Top row: the first `n` images; bottom row: their reconstructions from deterministic codes."""
    x = to_float(dataset.images(list(range(min(n, len(dataset))))))
    return image_grid(to_uint8(torch.cat([x, reconstruct(model, x).cpu()])), x.shape[0], scale=3)


def save_reconstructions(model: Autoencoder, dataset, path, n: int = 16) -> None:
    save_png(reconstruction_grid(model, dataset, n), path)


class Reconstructions(ImageSource):
    """A data set's images as the tokenizer gives them back: scored as samples are, they are the ceiling that a
    language model on this tokenizer's codes can reach in a feature space."""

    def __init__(self, model: Autoencoder, dataset: ImageDataset):
        self.model, self.dataset = model, dataset
        self.labels, self.name = dataset.labels, f"reconstructions of {dataset.name}"

    def __len__(self) -> int:
        return len(self.dataset)

    def batches(self, batch_size: int, size: int, channels: int) -> Iterator[np.ndarray]:
        for start in range(0, len(self.dataset), batch_size):
            x = to_float(self.dataset.images(np.arange(start, min(len(self.dataset), start + batch_size))))
            yield conform(
                to_uint8(reconstruct(self.model, x)).cpu().numpy().transpose(0, 2, 3, 1), size, channels, self.name
            )

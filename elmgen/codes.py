"""Pre-tokenized code files: a dataset encoded once, so LM training never runs the encoder.

A code folder holds `codes.npy` (N, L) with one K-bit cell code per grid cell (raster order),
`labels.npy` (N,), and `meta.json` naming the tokenizer (path and weights fingerprint), K, the grid
and the default vocabulary split. The split into sub-codes happens at load time, so one code folder
serves every vocabulary design with n dividing K.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from elmgen.data import ImageDataset, to_float
from elmgen.errors import ElmgenError
from elmgen.tokenizer import BinaryAutoencoder
from elmgen.vocab import Vocab, cells_to_subcodes


def code_dtype(bits: int) -> np.dtype:
    return np.dtype(np.uint16 if bits <= 16 else np.uint32 if bits <= 32 else np.int64)


@torch.no_grad()
def tokenize(tokenizer: BinaryAutoencoder, tokenizer_meta: dict, dataset: ImageDataset, out_dir,
             vocab: Vocab, flip: bool = False, batch_size: int = 256) -> dict:
    """Encode `dataset` (and its mirror images if `flip`) into a code folder; returns its meta."""
    K = tokenizer.code_bits
    Vocab.for_bits(str(vocab), K)
    out_dir = Path(out_dir)
    device = next(tokenizer.parameters()).device
    n = len(dataset)
    copies = 2 if flip else 1
    grid = tokenizer_meta["grid"]
    codes = np.empty((n * copies, grid * grid), dtype=code_dtype(K))
    for start in tqdm(range(0, n, batch_size), desc="tokenize", unit="batch"):
        idx = np.arange(start, min(n, start + batch_size))
        x = to_float(dataset.images(idx)).to(device)
        for c in range(copies):
            view = x.flip(-1) if c else x
            codes[c * n + idx] = tokenizer.encode_cells(view).cpu().numpy()
    labels = np.tile(dataset.labels, copies).astype(np.int64)
    meta = {
        "tokenizer": tokenizer_meta["path"],
        "tokenizer_fingerprint": tokenizer_meta["fingerprint"],
        "bits": K,
        "grid": grid,
        "vocab": str(vocab),
        "num_classes": dataset.num_classes,
        "class_names": dataset.class_names,
        "dataset": dataset.name,
        "flip": flip,
        "count": int(len(labels)),
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp_"))
    np.save(tmp / "codes.npy", codes)
    np.save(tmp / "labels.npy", labels)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return meta


class CodeDataset:
    """Memory-mapped code folder; `batch(idx, vocab)` gives sub-codes (B, L, n) and labels (B,)."""

    def __init__(self, path):
        path = Path(path)
        if not (path / "meta.json").is_file():
            raise ElmgenError(f"{path} is not a code folder (no meta.json); create one with 'elmgen tokenize'")
        self.path = path
        self.meta = json.loads((path / "meta.json").read_text())
        self.codes = np.load(path / "codes.npy", mmap_mode="r")
        self.labels = np.load(path / "labels.npy")
        L = self.meta["grid"] ** 2
        if self.codes.shape != (len(self.labels), L):
            raise ElmgenError(f"{path}: codes of shape {self.codes.shape} do not match {len(self.labels)} labels "
                              f"and a {self.meta['grid']}x{self.meta['grid']} grid; re-run 'elmgen tokenize'")

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: np.ndarray, vocab: Vocab) -> tuple[torch.Tensor, torch.Tensor]:
        cells_BL = torch.from_numpy(self.codes[idx].astype(np.int64))
        return cells_to_subcodes(cells_BL, vocab), torch.from_numpy(self.labels[idx])

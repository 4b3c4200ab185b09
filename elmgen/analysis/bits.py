"""Bit importance: what each of the K bits of a binary tokenizer's cell code costs the decoder when it is
flipped, and how hard the LM finds it to predict.

Bit k counts from the most significant bit of the cell code (`elmgen.vocab`): with the vocabulary n-c, bits
i*c .. i*c+c-1 form sub-code i. The LM predicts a distribution over each sub-code's 2^c values; a bit's
probability is that distribution summed over the values where the bit is set, so its cross-entropy
(nats/bit) is read off the LM's own softmax, with teacher forcing on held-out codes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from elmgen.analysis.attention import AttentionConfig, model_input, predicted_cells
from elmgen.analysis.names import write_result
from elmgen.data import DataConfig, load_dataset, to_float
from elmgen.errors import ElmgenError
from elmgen.models import Transformer, load_model
from elmgen.plots import pyplot, save_figure
from elmgen.tokenizers import load_tokenizer
from elmgen.vocab import Vocab, cells_to_subcodes


@torch.no_grad()
def flip_costs(tokenizer, x_BCHW: torch.Tensor, cells_BL: torch.Tensor, share: float = 1.0, seed: int = 0) -> dict:
    """Per bit k (lists of K): the mean increase in MSE and drop in PSNR (dB) of the reconstruction of images
    in [-1, 1] (whose codes are cells_BL) when bit k is flipped in a random share of the cells (all of them at
    1) before decoding, against the reconstruction of the unflipped codes."""
    K, grid = tokenizer.code_bits, x_BCHW.shape[-1] // tokenizer.cfg.downsample
    gen = torch.Generator().manual_seed(seed)
    flipped_BL = torch.rand(cells_BL.shape, generator=gen) < share  # the same cells for every bit

    def mse_B(cells):
        return (tokenizer.decode_cells(cells, grid).clamp(-1, 1) - x_BCHW).pow(2).flatten(1).mean(1).double()

    base_B = mse_B(cells_BL)
    mse, drop = [], []
    for k in range(K):
        flip_BL = flipped_BL.to(cells_BL.device).long() << (K - 1 - k)
        flipped_B = mse_B(cells_BL ^ flip_BL)
        mse.append((flipped_B - base_B).mean().item())
        # PSNR = 10 log10(peak^2 / MSE), so its drop is the MSE ratio in dB, whatever the peak
        drop.append((10 * torch.log10(flipped_B.clamp_min(1e-12) / base_B.clamp_min(1e-12))).mean().item())
    return {"mse_increase": mse, "psnr_drop": drop, "base_mse": base_B.mean().item()}


def bit_cross_entropy(logits_NnV: torch.Tensor, sub_Nn: torch.Tensor, vocab: Vocab) -> torch.Tensor:
    """(K,) mean cross-entropy (nats) of each bit of N cells: the softmax of each sub-code marginalised onto
    each of its c bits, scored on the true bit."""
    c = vocab.subcode_bits
    probs_NnV = logits_NnV.double().softmax(-1)
    shifts_c = torch.arange(c - 1, -1, -1)
    set_Vc = ((torch.arange(vocab.size)[:, None] >> shifts_c) & 1).double()  # bit j of value v (MSB first)
    p1_Nnc = (probs_NnV @ set_Vc).clamp(0, 1)
    true_Nnc = ((sub_Nn.long()[..., None] >> shifts_c) & 1).bool()
    p_true_Nnc = torch.where(true_Nnc, p1_Nnc, 1 - p1_Nnc)
    return -p_true_Nnc.clamp_min(1e-300).log().mean(0).flatten()


@torch.no_grad()
def lm_bit_losses(
    model: Transformer, labels_B: torch.Tensor, sub_BLn: torch.Tensor, batch_size: int = 32, seed: int = 0
) -> list[float]:
    """Per bit, the LM's mean cross-entropy (nats/bit) on codes (B, L, n), teacher-forced as in training: AR
    every cell given the cells before it; MLM the cells masked at the training ratio's midpoint (0.5)."""
    model.eval()
    logits, targets = [], []
    cfg = AttentionConfig(seed=seed)
    for i in range(0, len(labels_B), batch_size):
        sub = sub_BLn[i : i + batch_size]
        x = model_input(model, sub, cfg)
        scored_BL = predicted_cells(model, x)
        logits.append(model.at_cells(model(labels_B[i : i + batch_size], x).float())[scored_BL])
        targets.append(sub[scored_BL])
    return bit_cross_entropy(torch.cat(logits), torch.cat(targets), model.cfg.vocabulary).tolist()


@dataclass
class BitsConfig:
    data: str | None = None  # images: 'fashion-mnist' or a class folder (default: the tokenizer's own data set)
    split: str = "test"  # split of the held-out images
    limit: int = 256  # held-out images used
    share: float = 1.0  # share of the cells whose bit is flipped
    batch_size: int = 32  # images (and sequences) per forward pass
    seed: int = 0  # picks the flipped cells and the MLM masks

    def validate(self) -> None:
        if not 0 < self.share <= 1:
            raise ElmgenError(f"share must be in (0, 1], not {self.share}")
        if self.limit < 1 or self.batch_size < 1:
            raise ElmgenError("limit and batch size must be positive")


def analyze_bits(tokenizer_path, out_dir, cfg: BitsConfig, model_path=None) -> dict:
    """bits.json and bits.png: per bit, the flip cost on held-out images and (with an LM) its loss there."""
    cfg.validate()
    tokenizer, tmeta = load_tokenizer(tokenizer_path)
    if tokenizer.cfg.quantizer != "bae":
        raise ElmgenError(f"bit importance needs a binary tokenizer (bae), not {tokenizer.cfg.quantizer}")
    data_cfg = DataConfig(**tmeta.get("data", {}))
    data_cfg = replace(data_cfg, split=cfg.split, limit=cfg.limit, **({"source": cfg.data} if cfg.data else {}))
    dataset = load_dataset(data_cfg)
    n = min(cfg.limit, len(dataset))
    parts, cells, counts = [], [], []
    for start in range(0, n, cfg.batch_size):
        x = to_float(dataset.images(np.arange(start, min(n, start + cfg.batch_size))))
        cells.append(tokenizer.encode_cells(x))
        parts.append(flip_costs(tokenizer, x, cells[-1], cfg.share, cfg.seed + start))
        counts.append(len(x))
    w = np.array(counts) / n
    keys = ("mse_increase", "psnr_drop", "base_mse")
    result = {
        "tokenizer": str(tokenizer_path),
        "bits": tokenizer.code_bits,
        "images": n,
        "config": asdict(cfg),
        **{k: (np.array([p[k] for p in parts]).T @ w).tolist() for k in keys},
    }
    if model_path is not None:
        model, _ = load_model(model_path)
        vocab = Vocab.for_bits(model.cfg.vocab, tokenizer.code_bits)
        grid = int(cells[0].shape[1] ** 0.5)
        if grid != model.cfg.grid_size:
            raise ElmgenError(f"the tokenizer gives a {grid}x{grid} grid; the model expects {model.cfg.grid_size}")
        sub_BLn = cells_to_subcodes(torch.cat(cells), vocab)
        labels_B = torch.as_tensor(dataset.labels[:n], dtype=torch.long)
        result["model"], result["vocab"] = str(model_path), str(vocab)
        result["lm_nats"] = lm_bit_losses(model, labels_B, sub_BLn, cfg.batch_size, cfg.seed)
    return write_result(out_dir, "bits", result, plot_bits)


def plot_bits(result: dict, path) -> None:
    """Left: PSNR drop of flipping each bit; right (with an LM): its loss in nats, ln 2 dotted (a coin)."""
    plt = pyplot()
    panels = 1 + ("lm_nats" in result)
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.2), dpi=110, squeeze=False)
    bits = np.arange(result["bits"])
    axes[0, 0].bar(bits, result["psnr_drop"])
    axes[0, 0].set_title(f"PSNR drop when the bit is flipped (share {result['config']['share']:g})", fontsize=9)
    axes[0, 0].set_ylabel("dB")
    if "lm_nats" in result:
        axes[0, 1].bar(bits, result["lm_nats"], color="C1")
        axes[0, 1].axhline(np.log(2), color="k", ls=":", lw=1)
        axes[0, 1].set_title(f"LM cross-entropy per bit (vocabulary {result['vocab']})", fontsize=9)
        axes[0, 1].set_ylabel("nats")
    for ax in axes[0]:
        ax.set_xlabel("bit (0: most significant)")
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    save_figure(fig, path)

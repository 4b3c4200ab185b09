"""Pictures: image grids (PIL) and training curves (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from elmgen.io import atomic_write


def image_grid(images_NCHW: torch.Tensor, ncols: int, pad: int = 2, scale: int = 1) -> Image.Image:
    """uint8 images (N, C, H, W) -> one PIL image, row-major, with white padding."""
    images = images_NCHW.cpu().numpy()
    N, C, H, W = images.shape
    nrows = -(-N // ncols)
    canvas = np.full((C, nrows * (H + pad) + pad, ncols * (W + pad) + pad), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, ncols)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        canvas[:, y : y + H, x : x + W] = img
    out = Image.fromarray(canvas[0] if C == 1 else canvas.transpose(1, 2, 0))
    return out.resize((out.width * scale, out.height * scale), Image.NEAREST) if scale > 1 else out


def save_png(image: Image.Image, path: str | Path) -> None:
    atomic_write(path, lambda f: image.save(f, format="PNG"))


def save_figure(fig, path: str | Path) -> None:
    """Write a matplotlib figure as PNG (atomically) and free it."""
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    pyplot().close(fig)


def pyplot():
    """matplotlib.pyplot on the headless Agg backend, imported on first use (it is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curve(
    rows: list[dict], path: str | Path, title: str = "training loss", hline: float | None = None, hline_label: str = ""
) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.5)
    if hline is not None:
        ax.axhline(hline, color="grey", ls="--", lw=1, label=hline_label)
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)

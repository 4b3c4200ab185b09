"""Pixel maps and augmentation: uint8 <-> [-1, 1] floats, random flips and shifts (from torch's global RNG,
which the trainers seed and checkpoint), and the crops that pre-tokenization stores as extra views."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def to_float(images_BCHW: torch.Tensor) -> torch.Tensor:
    return images_BCHW.float().div(127.5).sub(1.0)


def to_uint8(images_BCHW: torch.Tensor) -> torch.Tensor:
    return images_BCHW.float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def random_hflip(x_BCHW: torch.Tensor) -> torch.Tensor:
    """Each image mirrored left-right with probability 1/2."""
    flip_B = torch.rand(x_BCHW.shape[0], device=x_BCHW.device) < 0.5
    return torch.where(flip_B[:, None, None, None], x_BCHW.flip(-1), x_BCHW)


def random_shift(x_BCHW: torch.Tensor, shift: int) -> torch.Tensor:
    """Each image translated by up to `shift` pixels each way, edge pixels repeated."""
    B, _, H, W = x_BCHW.shape
    padded = F.pad(x_BCHW, (shift,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * shift + 1, (2, B)).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + H, dx[i] : dx[i] + W] for i in range(B)])


CROPS = ("none", "five", "random")


def crop_source_size(image_size: int, crop_range: float) -> int:
    """Side at which to load images so that crops of `image_size` cover a `crop_range` share of them."""
    return round(image_size * crop_range)


def crop_views(
    x_BCHW: torch.Tensor, size: int, crops: str, num_crops: int, image_ids: np.ndarray, seed: int
) -> list[torch.Tensor]:
    """The crops of a batch of square images, one (B, C, size, size) tensor per crop."""
    S = x_BCHW.shape[-1]
    if crops == "none":
        return [x_BCHW]
    if crops == "five":
        m = S - size
        return [
            x_BCHW[..., t : t + size, le : le + size] for t, le in ((0, 0), (0, m), (m, 0), (m, m), (m // 2, m // 2))
        ]
    # Random crops, LlamaGen-style: resize to a random side in [size, S], then crop at a random place.
    out: list[list[torch.Tensor]] = [[] for _ in range(num_crops)]
    for b, image in enumerate(image_ids):
        rng = np.random.default_rng([seed, int(image)])
        for c in range(num_crops):
            side = int(rng.integers(size, S + 1))
            top, left = (int(v) for v in rng.integers(0, side - size + 1, size=2))
            img = x_BCHW[b : b + 1]
            if side != S:
                img = F.interpolate(img, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
            out[c].append(img[..., top : top + size, left : left + size])
    return [torch.cat(views) for views in out]

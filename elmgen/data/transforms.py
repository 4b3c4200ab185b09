"""Pixel maps and augmentation: uint8 <-> [-1, 1] floats, random flips, shifts and blurs (from uniform draws the
caller makes: the trainers' input pipeline draws them per image from its seed and step), and the crops that
pre-tokenization stores as extra views."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def to_float(images_BCHW: torch.Tensor) -> torch.Tensor:
    return images_BCHW.float().div(127.5).sub(1.0)


def to_uint8(images_BCHW: torch.Tensor) -> torch.Tensor:
    return images_BCHW.float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def random_hflip(x_BCHW: torch.Tensor, u_B: torch.Tensor) -> torch.Tensor:
    """Each image mirrored left-right when its uniform draw in `u_B` is below 1/2."""
    flip_B = u_B.to(x_BCHW.device) < 0.5
    return torch.where(flip_B[:, None, None, None], x_BCHW.flip(-1), x_BCHW)


def random_shift(x_BCHW: torch.Tensor, shift: int, u_B2: torch.Tensor) -> torch.Tensor:
    """Each image translated by up to `shift` pixels each way (rows, then columns, from its two uniform draws in
    `u_B2`), edge pixels repeated; any dtype (uint8 in the input pipeline's workers)."""
    B, _, H, W = x_BCHW.shape
    offsets_B2 = (u_B2 * (2 * shift + 1)).long().clamp(max=2 * shift) - shift
    rows_BH = (torch.arange(H) + offsets_B2[:, :1]).clamp(0, H - 1)
    cols_BW = (torch.arange(W) + offsets_B2[:, 1:]).clamp(0, W - 1)
    batch_B11 = torch.arange(B)[:, None, None]
    return x_BCHW.permute(0, 2, 3, 1)[batch_B11, rows_BH[:, :, None], cols_BW[:, None, :]].permute(0, 3, 1, 2)


def random_blur(x_BCHW: torch.Tensor, max_sigma: float, u_B: torch.Tensor) -> torch.Tensor:
    """Each image blurred by a Gaussian of standard deviation u * max_sigma pixels (u: its draw in `u_B`; 0 leaves
    it as it is), edge pixels repeated; uint8 in and out."""
    B, C, H, W = x_BCHW.shape
    radius = math.ceil(3 * max_sigma)
    offsets_K = torch.arange(-radius, radius + 1, dtype=torch.float32)
    sigma_B1 = (u_B.float() * max_sigma).clamp(min=1e-3)[:, None]  # a kernel of 1e-3 px is the identity
    kernel_BK = torch.softmax(-(offsets_K**2) / (2 * sigma_B1**2), dim=1)  # normalised Gaussian weights
    kernel_N1K = kernel_BK.repeat_interleave(C, dim=0)[:, None]
    x_1NHW = F.pad(x_BCHW.float().reshape(1, B * C, H, W), (radius,) * 4, mode="replicate")
    x_1NHW = F.conv2d(x_1NHW, kernel_N1K[..., None], groups=B * C)  # down each column
    x_1NHW = F.conv2d(x_1NHW, kernel_N1K[:, :, None], groups=B * C)  # along each row
    return x_1NHW.reshape(B, C, H, W).round().clamp(0, 255).to(x_BCHW.dtype)


CROPS = ("none", "five", "random", "shift")


def crop_source_size(image_size: int, crop_range: float, crops: str = "random") -> int:
    """Side at which to load images so that crops of `image_size` cover a `crop_range` share of them (shift crops
    pad the image itself with its edge pixels instead of enlarging it)."""
    return image_size if crops == "shift" else round(image_size * crop_range)


def max_shift(image_size: int, crop_range: float) -> int:
    """The largest translation, in pixels each way, of a shift crop: the padding that takes `image_size` to
    `crop_range` times it."""
    return (round(image_size * crop_range) - image_size) // 2


def crop_views(
    x_BCHW: torch.Tensor, size: int, crops: str, num_crops: int, image_ids: np.ndarray, seed: int, crop_range: float
) -> list[torch.Tensor]:
    """The crops of a batch of square images, one (B, C, size, size) tensor per crop."""
    S = x_BCHW.shape[-1]
    if crops == "none":
        return [x_BCHW]
    if crops == "shift":  # translations, edge pixels repeated: nothing is resampled, so edges stay as sharp
        u_BC2 = torch.as_tensor(
            np.stack([np.random.default_rng([seed, int(i)]).random((num_crops, 2)) for i in image_ids])
        )
        return [random_shift(x_BCHW, max_shift(size, crop_range), u_BC2[:, c]) for c in range(num_crops)]
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

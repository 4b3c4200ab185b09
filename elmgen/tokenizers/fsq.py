"""Finite scalar quantization: a few channels, each rounded to a fixed number of levels."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from elmgen.tokenizers.config import TokenizerConfig
from elmgen.tokenizers.quantizer import Quantized, straight_through


class FiniteScalarQuantizer(nn.Module):
    """d channels, each squashed to [0, L_i - 1] and rounded; the cell code is the mixed-radix number
    of the d digits, the first channel most significant."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        levels = cfg.fsq_levels
        radix = [math.prod(levels[i + 1 :]) for i in range(len(levels))]
        self.register_buffer("levels", torch.tensor(levels)[:, None, None], persistent=False)
        self.register_buffer("radix", torch.tensor(radix)[:, None], persistent=False)
        self.proj_in = nn.Conv2d(cfg.latent_dim, len(levels), 1)
        self.proj_out = nn.Conv2d(len(levels), cfg.latent_dim, 1)

    def _digits(self, z_BChw: torch.Tensor) -> torch.Tensor:
        """(B, d, h, w) digits in [0, L_i - 1], rounded with a straight-through gradient."""
        soft = (torch.tanh(self.proj_in(z_BChw).float()) + 1) * ((self.levels - 1) / 2)
        return straight_through(soft.round(), soft)

    def _latent(self, digits_BQhw: torch.Tensor) -> torch.Tensor:
        return self.proj_out(digits_BQhw * (2 / (self.levels - 1)) - 1)

    def _cells(self, digits_BQhw: torch.Tensor) -> torch.Tensor:
        return (digits_BQhw.detach().long().flatten(2) * self.radix).sum(1)

    def forward(self, z_BChw: torch.Tensor) -> Quantized:
        digits = self._digits(z_BChw)
        return Quantized(self._latent(digits), z_BChw.new_zeros(()), self._cells(digits))

    def cells(self, z_BChw: torch.Tensor) -> torch.Tensor:
        return self._cells(self._digits(z_BChw))

    def lookup(self, cells_BL: torch.Tensor, h: int, w: int) -> torch.Tensor:
        digits_BQL = cells_BL[:, None] // self.radix % self.levels[..., 0]
        return self._latent(digits_BQL.float().view(cells_BL.shape[0], -1, h, w))

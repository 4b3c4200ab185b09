"""What every quantizer returns, and the straight-through gradient they share."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Quantized(NamedTuple):
    z_BChw: torch.Tensor  # what the decoder reads; carries the straight-through gradient to the encoder
    loss: torch.Tensor  # the quantizer's own training loss (0 when it has none)
    cells_BL: torch.Tensor  # integer cell codes, raster order


def straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Exactly `hard` in value ((hard - soft) + soft would round), with the gradient of `soft`."""
    return hard.detach() + (soft - soft.detach())

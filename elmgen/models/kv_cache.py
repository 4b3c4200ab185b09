"""The static-shape key/value cache of autoregressive decoding."""

from __future__ import annotations

import torch
import torch.nn as nn


class KVCache(nn.Module):
    """Preallocated keys/values for one layer: (B, A, T_max, e). Shapes never change, so a
    compiled decode step is traced once."""

    def __init__(self, batch: int, n_head: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos_T: torch.Tensor, k_BATe, v_BATe):
        self.k.index_copy_(2, pos_T, k_BATe)
        self.v.index_copy_(2, pos_T, v_BATe)
        return self.k, self.v

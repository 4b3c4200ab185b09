"""Vector quantization as in LlamaGen: nearest-neighbour lookup in a codebook of l2-normalised
low-dimensional codes, codebook and commitment losses, straight-through gradient."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from elmgen.tokenizers.config import TokenizerConfig
from elmgen.tokenizers.quantizer import Quantized, straight_through


class VectorQuantizer(nn.Module):
    """Nearest code by cosine similarity: latents and codes are l2-normalised in a low dimension."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.commit_weight = cfg.commit_weight
        self.proj_in = nn.Conv2d(cfg.latent_dim, cfg.code_dim, 1)
        self.codebook = nn.Embedding(cfg.codebook_size, cfg.code_dim)
        self.proj_out = nn.Conv2d(cfg.code_dim, cfg.latent_dim, 1)

    def _unit_latents(self, z_BChw: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj_in(z_BChw).float(), dim=1)

    @torch.no_grad()
    def _nearest(self, u_BQhw: torch.Tensor) -> torch.Tensor:
        """(B, h*w) indices of the most similar codes; fp32, in row chunks (all rows x all codes can be GBs)."""
        u_NQ = u_BQhw.flatten(2).transpose(1, 2).reshape(-1, u_BQhw.shape[1])
        codes_QE = F.normalize(self.codebook.weight.float(), dim=1).T.contiguous()  # contiguous: faster than a .T view
        chunk = max(1, (1 << 22) // codes_QE.shape[1])
        with torch.autocast(u_NQ.device.type, enabled=False):
            idx_N = torch.cat([(u @ codes_QE).argmax(1) for u in u_NQ.split(chunk)])
        return idx_N.view(u_BQhw.shape[0], -1)

    def _codes(self, cells_BL: torch.Tensor, h: int, w: int) -> torch.Tensor:
        q_BLQ = F.normalize(self.codebook(cells_BL).float(), dim=-1)
        return q_BLQ.transpose(1, 2).reshape(cells_BL.shape[0], -1, h, w)

    def forward(self, z_BChw: torch.Tensor) -> Quantized:
        u_BQhw = self._unit_latents(z_BChw)
        cells_BL = self._nearest(u_BQhw)
        q_BQhw = self._codes(cells_BL, *u_BQhw.shape[-2:])
        # The codebook term pulls codes to the latents; the commitment term keeps the encoder near its codes.
        loss = F.mse_loss(q_BQhw, u_BQhw.detach()) + self.commit_weight * F.mse_loss(u_BQhw, q_BQhw.detach())
        return Quantized(self.proj_out(straight_through(q_BQhw, u_BQhw)), loss, cells_BL)

    def cells(self, z_BChw: torch.Tensor) -> torch.Tensor:
        return self._nearest(self._unit_latents(z_BChw))

    def lookup(self, cells_BL: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.proj_out(self._codes(cells_BL, h, w))

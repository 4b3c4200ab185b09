"""The binary quantizer of the BAE: per-bit probabilities p = sigmoid(logits), binarized by a Bernoulli draw
or p > 0.5 with a straight-through gradient; the K bits map back to the latent width as the sum of one
learned embedding per active bit."""

from __future__ import annotations

import torch
import torch.nn as nn

from elmgen.tokenizers.config import TokenizerConfig
from elmgen.tokenizers.quantizer import Quantized, straight_through
from elmgen.vocab import bits_to_cells, cells_to_bits


def binarize(probs: torch.Tensor, mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """{0,1} bits from probabilities, with a straight-through gradient to `probs`."""
    if mode == "bernoulli":
        hard = torch.bernoulli(probs.detach(), generator=generator)
    else:
        hard = (probs.detach() > 0.5).to(probs.dtype)
    # Contiguous, as a Bernoulli draw is: a channels-last comparison would carry that layout into the decoder, whose
    # group norms run at half speed in it on the CPU (measured: a deterministic BAE step took 1.5 times a Bernoulli one)
    return straight_through(hard, probs).contiguous()


class BinaryQuantizer(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.num_bits, self.mode = cfg.num_bits, cfg.binarization
        self.to_logits = nn.Conv2d(cfg.latent_dim, cfg.num_bits, 1)
        self.embed = nn.Conv2d(cfg.num_bits, cfg.latent_dim, 1)  # sum of per-bit embeddings (+ bias)

    def probs(self, z_BChw: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.to_logits(z_BChw))

    def forward(self, z_BChw: torch.Tensor) -> Quantized:
        bits_BKhw = binarize(self.probs(z_BChw), self.mode)
        return Quantized(self.embed(bits_BKhw), z_BChw.new_zeros(()), bits_to_cells(bits_BKhw.detach()))

    def cells(self, z_BChw: torch.Tensor) -> torch.Tensor:
        return bits_to_cells(self.probs(z_BChw) > 0.5)

    def lookup(self, cells_BL: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.embed(cells_to_bits(cells_BL, self.num_bits, h, w).to(self.embed.weight))

"""The tokenizer's configuration: architecture, quantizer and code space, and its training memory."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from elmgen.errors import ElmgenError

QUANTIZERS = ("bae", "vq", "fsq")


@dataclass
class TokenizerConfig:
    in_channels: int = 1  # 1 grey, 3 RGB
    base_width: int = 64  # channels of the first level
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])  # one per level; levels-1 downsamplings
    num_res_blocks: int = 1  # ResBlocks per level
    # Layout options that the released ELM BAEs and LlamaGen's VQ need (elmgen.hub.tokenizers sets them)
    decoder_res_blocks: int = 0  # ResBlocks per decoder level; 0: num_res_blocks + 1 (taming; ELM: num_res_blocks)
    level_attention: bool = False  # attention after each ResBlock of the lowest level, not only in the middle
    asymmetric_downsample: bool = False  # pad right and bottom only before each stride-2 conv (taming)
    out_silu: bool = True  # SiLU between the last norm and the output conv of encoder and decoder (ELM: none)
    decoder_in_norm: bool = True  # GroupNorm on the decoder's input (ELM: norm_first; LlamaGen: none)
    unit_pixels: bool = False  # the nets read and write pixels in [0, 1] (ELM); images outside stay in [-1, 1]
    latent_dim: int = 64  # width of the continuous latent around the quantizer
    quantizer: str = "bae"  # "bae" (K bits a cell), "vq" (codebook) or "fsq" (finite scalar levels)
    num_bits: int = 16  # bae: K, bits per grid cell
    binarization: str = "bernoulli"  # bae: training-time binarization, "bernoulli" or "deterministic"
    codebook_size: int = 1024  # vq: number of codes; a cell code takes ceil(log2 size) bits
    code_dim: int = 8  # vq: width of the l2-normalised codes
    commit_weight: float = 0.25  # vq: weight of the commitment loss (beta)
    fsq_levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])  # fsq: levels of each channel

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def decoder_blocks(self) -> int:
        """ResBlocks per decoder level."""
        return self.decoder_res_blocks or self.num_res_blocks + 1

    @property
    def num_codes(self) -> int:
        """Size of the code space: how many distinct cell codes the quantizer can emit."""
        if self.quantizer == "vq":
            return self.codebook_size
        if self.quantizer == "fsq":
            return math.prod(self.fsq_levels)
        return 2**self.num_bits

    @property
    def code_bits(self) -> int:
        """K: bits of one cell code, ceil(log2 num_codes)."""
        return (self.num_codes - 1).bit_length()

    def validate(self) -> None:
        if self.quantizer not in QUANTIZERS:
            raise ElmgenError(f"tokenizer.quantizer must be one of {', '.join(QUANTIZERS)}, not {self.quantizer!r}")
        if self.binarization not in ("bernoulli", "deterministic"):
            raise ElmgenError(f"binarization must be 'bernoulli' or 'deterministic', not {self.binarization!r}")
        if not self.channel_mult:
            raise ElmgenError("channel_mult needs at least one level")
        if self.decoder_res_blocks < 0:
            raise ElmgenError(f"decoder_res_blocks must be >= 0 (0: num_res_blocks + 1), not {self.decoder_res_blocks}")
        if self.codebook_size < 2 or self.code_dim < 1:
            raise ElmgenError("vq needs codebook_size >= 2 and code_dim >= 1")
        if not self.fsq_levels or min(self.fsq_levels) < 2:
            raise ElmgenError(f"fsq_levels needs at least one channel of 2 or more levels, not {self.fsq_levels}")
        if self.num_bits < 1 or self.code_bits > 62:
            raise ElmgenError(f"cell codes need between 1 and 62 bits; this {self.quantizer} needs {self.code_bits}")


def training_memory_gb(cfg: TokenizerConfig, image_size: int, batch_size: int) -> float:
    """Estimated peak memory (GB) of one fp32 training step, dominated by what the backward pass keeps: about
    7 tensors (input, norms, activations, convolutions) for each of the blocks of a level (encoder and decoder
    ResBlocks, 2 resamplings) at that level's width and side, and the (h w)^2 attention scores and
    probabilities of the two middle blocks. Within 10% of measured CPU peaks from 64 to 256 px."""
    sides = [image_size / 2**i for i in range(len(cfg.channel_mult))]
    per_level = [cfg.base_width * m * side**2 for m, side in zip(cfg.channel_mult, sides, strict=True)]
    convs = 7 * (cfg.num_res_blocks + cfg.decoder_blocks + 2) * sum(per_level)
    attention = 4 * (sides[-1] ** 2) ** 2
    return batch_size * (convs + attention) * 4 / 1e9

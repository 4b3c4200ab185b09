"""Vocabulary design: a K-bit code per grid cell split into n sub-codes of c = K/n bits.

Bits are read most significant first, in raster order: bits (B, K, h, w) -> cell codes (B, L)
with L = h*w -> sub-codes (B, L, n), each an integer in [0, 2^c). Every map is exactly invertible.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from elmgen.errors import ElmgenError


@dataclass(frozen=True)
class Vocab:
    num_subcodes: int  # n
    subcode_bits: int  # c

    @property
    def bits(self) -> int:  # K
        return self.num_subcodes * self.subcode_bits

    @property
    def size(self) -> int:  # entries of one sub-code vocabulary
        return 2**self.subcode_bits

    def __str__(self) -> str:
        return f"{self.num_subcodes}-{self.subcode_bits}"

    @classmethod
    def parse(cls, text: str) -> Vocab:
        """'2-8' -> 2 sub-codes of 8 bits."""
        m = re.fullmatch(r"\s*(\d+)-(\d+)\s*", str(text))
        if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
            raise ElmgenError(f"vocabulary {text!r} is not of the form N-C (e.g. 2-8: 2 sub-codes of 8 bits)")
        return cls(int(m.group(1)), int(m.group(2)))

    @classmethod
    def split(cls, bits: int, num_subcodes: int) -> Vocab:
        if num_subcodes < 1 or bits % num_subcodes:
            raise ElmgenError(f"K={bits} bits cannot be split into {num_subcodes} equal sub-codes; {_choices(bits)}")
        return cls(num_subcodes, bits // num_subcodes)

    @classmethod
    def for_bits(cls, text: str, bits: int) -> Vocab:
        """Parse 'n-c' and check that it splits exactly the K bits of a tokenizer."""
        vocab = cls.parse(text)
        if vocab.bits != bits:
            raise ElmgenError(
                f"vocabulary {vocab} covers {vocab.bits} bits but the codes have K={bits}: "
                f"n must divide K; {_choices(bits)}"
            )
        return vocab


def _choices(bits: int) -> str:
    return "use one of " + ", ".join(f"{n}-{bits // n}" for n in range(1, bits + 1) if bits % n == 0)


def _weights(nbits: int, device) -> torch.Tensor:
    return 2 ** torch.arange(nbits - 1, -1, -1, device=device, dtype=torch.int64)


def bits_to_cells(bits_BKhw: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) of {0,1} -> (B, h*w) int64 cell codes, first bit most significant."""
    B, K, h, w = bits_BKhw.shape
    if K > 62:
        raise ElmgenError(f"K={K} bits do not fit one int64 cell code")
    bits_BLK = bits_BKhw.flatten(2).transpose(1, 2).long()
    return (bits_BLK * _weights(K, bits_BKhw.device)).sum(-1)


def cells_to_bits(cells_BL: torch.Tensor, bits: int, h: int, w: int) -> torch.Tensor:
    """Inverse of `bits_to_cells`: (B, h*w) -> (B, K, h, w) float {0,1}."""
    B, L = cells_BL.shape
    if L != h * w:
        raise ElmgenError(f"{L} cells do not form a {h}x{w} grid")
    bits_BLK = (cells_BL.long().unsqueeze(-1) // _weights(bits, cells_BL.device)) % 2
    return bits_BLK.transpose(1, 2).reshape(B, bits, h, w).float()


def cells_to_subcodes(cells_BL: torch.Tensor, vocab: Vocab) -> torch.Tensor:
    """(B, L) cell codes -> (B, L, n) sub-codes, the first sub-code holding the top bits."""
    shifts = vocab.subcode_bits * torch.arange(vocab.num_subcodes - 1, -1, -1, device=cells_BL.device)
    return (cells_BL.long().unsqueeze(-1) >> shifts) & (vocab.size - 1)


def subcodes_to_cells(sub_BLn: torch.Tensor, vocab: Vocab) -> torch.Tensor:
    shifts = vocab.subcode_bits * torch.arange(vocab.num_subcodes - 1, -1, -1, device=sub_BLn.device)
    return (sub_BLn.long() << shifts).sum(-1)

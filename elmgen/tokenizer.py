"""Binary autoencoder (BAE): a VQGAN-style conv encoder/decoder around a K-bit quantizer.

The quantizer predicts per-bit probabilities p = sigmoid(logits), binarizes them (Bernoulli draw
or p > 0.5) with a straight-through gradient, and maps the K bits back to the latent width with a
linear map (the sum of one learned embedding per active bit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from elmgen.errors import ElmgenError
from elmgen.vocab import bits_to_cells, cells_to_bits


@dataclass
class TokenizerConfig:
    in_channels: int = 1  # 1 grey, 3 RGB
    base_width: int = 64  # channels of the first level
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])  # one per level; levels-1 downsamplings
    num_res_blocks: int = 1  # ResBlocks per level
    latent_dim: int = 64  # width of the continuous latent around the quantizer
    num_bits: int = 16  # K: bits per grid cell
    binarization: str = "bernoulli"  # training-time binarization: "bernoulli" or "deterministic"

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def validate(self) -> None:
        if self.binarization not in ("bernoulli", "deterministic"):
            raise ElmgenError(f"binarization must be 'bernoulli' or 'deterministic', not {self.binarization!r}")
        if self.num_bits < 1 or self.num_bits > 62:
            raise ElmgenError(f"num_bits must be between 1 and 62, not {self.num_bits}")
        if not self.channel_mult:
            raise ElmgenError("channel_mult needs at least one level")


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, ch), ch, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions (used only at the lowest resolution)."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x_BChw):
        B, C, h, w = x_BChw.shape
        q, k, v = self.qkv(self.norm(x_BChw)).flatten(2).transpose(1, 2).chunk(3, dim=-1)
        out_BLC = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x_BChw + self.proj(out_BLC.transpose(1, 2).reshape(B, C, h, w))


def _mid(ch: int) -> nn.Sequential:
    return nn.Sequential(ResBlock(ch, ch), AttnBlock(ch), ResBlock(ch, ch))


class Encoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        widths = [cfg.base_width * m for m in cfg.channel_mult]
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)]
        cin = widths[0]
        for i, cout in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(cin, cout))
                cin = cout
            if i < len(widths) - 1:
                layers.append(nn.Conv2d(cin, cin, 3, stride=2, padding=1))
        layers += [_mid(cin), _norm(cin), nn.SiLU(), nn.Conv2d(cin, cfg.latent_dim, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        widths = [cfg.base_width * m for m in cfg.channel_mult][::-1]
        cin = widths[0]
        layers: list[nn.Module] = [_norm(cfg.latent_dim), nn.Conv2d(cfg.latent_dim, cin, 3, padding=1), _mid(cin)]
        for i, cout in enumerate(widths):
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResBlock(cin, cout))
                cin = cout
            if i < len(widths) - 1:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cin, 3, padding=1)]
        layers += [_norm(cin), nn.SiLU(), nn.Conv2d(cin, cfg.in_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z)


def binarize(probs: torch.Tensor, mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """{0,1} bits from probabilities, with a straight-through gradient to `probs`."""
    if mode == "bernoulli":
        hard = torch.bernoulli(probs.detach(), generator=generator)
    else:
        hard = (probs.detach() > 0.5).to(probs.dtype)
    return hard + (probs - probs.detach())  # exactly `hard` in value; (a + p) - p would round


class BinaryQuantizer(nn.Module):
    def __init__(self, latent_dim: int, num_bits: int):
        super().__init__()
        self.to_logits = nn.Conv2d(latent_dim, num_bits, 1)
        self.embed = nn.Conv2d(num_bits, latent_dim, 1)  # sum of per-bit embeddings (+ bias)

    def probs(self, z_BChw):
        return torch.sigmoid(self.to_logits(z_BChw))


class BinaryAutoencoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = BinaryQuantizer(cfg.latent_dim, cfg.num_bits)
        self.decoder = Decoder(cfg)

    def bit_probs(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.quantizer.probs(self.encoder(x_BCHW))

    def encode(self, x_BCHW: torch.Tensor, mode: str = "deterministic", generator=None) -> torch.Tensor:
        """Images in [-1, 1] -> bits (B, K, h, w) in {0, 1}."""
        self._check_input(x_BCHW)
        return binarize(self.bit_probs(x_BCHW), mode, generator).detach()

    def decode(self, bits_BKhw: torch.Tensor) -> torch.Tensor:
        """Bits (B, K, h, w) -> images in about [-1, 1]."""
        if bits_BKhw.shape[1] != self.cfg.num_bits:
            raise ElmgenError(f"decoder expects {self.cfg.num_bits} bits per cell, got {bits_BKhw.shape[1]}")
        return self.decoder(self.quantizer.embed(bits_BKhw))

    # The interface every tokenizer offers to the rest of elmgen: integer cell codes in raster order.
    @property
    def code_bits(self) -> int:
        """Bits of one cell code (K): cell codes lie in [0, 2^K)."""
        return self.cfg.num_bits

    def encode_cells(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> (B, h*w) int64 cell codes, deterministic binarization."""
        return bits_to_cells(self.encode(x_BCHW))

    def decode_cells(self, cells_BL: torch.Tensor, grid: int) -> torch.Tensor:
        """(B, grid*grid) cell codes -> images in about [-1, 1]."""
        return self.decode(cells_to_bits(cells_BL, self.code_bits, grid, grid).to(self.quantizer.embed.weight))

    def forward(self, x_BCHW: torch.Tensor):
        """Training pass: reconstruction, bit probabilities and the (straight-through) bits."""
        probs = self.bit_probs(x_BCHW)
        bits = binarize(probs, self.cfg.binarization)
        return self.decode(bits), probs, bits

    def _check_input(self, x):
        f = self.cfg.downsample
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels or x.shape[-1] % f or x.shape[-2] % f:
            raise ElmgenError(
                f"tokenizer expects images (B, {self.cfg.in_channels}, H, W) with H, W divisible by {f}, "
                f"got {tuple(x.shape)}"
            )


def load_tokenizer(path, device="cpu") -> tuple[BinaryAutoencoder, dict]:
    """A trained tokenizer and its checkpoint config (which includes the image size)."""
    from elmgen import checkpoint
    from elmgen.config import from_dict

    meta = checkpoint.load_config(path)
    if meta.get("kind") != "bae":
        raise ElmgenError(f"{path} is not a tokenizer checkpoint (kind {meta.get('kind')!r})")
    model = BinaryAutoencoder(from_dict(TokenizerConfig, meta["tokenizer"]))
    checkpoint.load_weights(path, model)
    meta["fingerprint"] = checkpoint.fingerprint(path)
    meta["path"] = str(checkpoint.resolve(path).parent.parent.resolve())
    return model.to(device).eval(), meta

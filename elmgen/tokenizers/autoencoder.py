"""The tokenizer: a VQGAN-style conv encoder/decoder around one of three quantizers (`bae`, `vq`, `fsq`).

All three offer the rest of elmgen one interface: integer cell codes in [0, 2^code_bits), raster
order (`encode_cells` / `decode_cells`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from elmgen import checkpoint
from elmgen.config import from_dict
from elmgen.errors import ElmgenError
from elmgen.tokenizers.bae import BinaryQuantizer
from elmgen.tokenizers.config import QUANTIZERS, TokenizerConfig
from elmgen.tokenizers.fsq import FiniteScalarQuantizer
from elmgen.tokenizers.quantizer import Quantized
from elmgen.tokenizers.vq import VectorQuantizer
from elmgen.vocab import Vocab, bits_to_cells


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


def _out(cfg: TokenizerConfig, cin: int, cout: int) -> list[nn.Module]:
    return [_norm(cin), *([nn.SiLU()] if cfg.out_silu else []), nn.Conv2d(cin, cout, 3, padding=1)]


def _level(cfg: TokenizerConfig, cin: int, cout: int, blocks: int, lowest: bool) -> list[nn.Module]:
    """One resolution level's ResBlocks, each followed by attention at the lowest level if the config asks."""
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers.append(ResBlock(cin, cout))
        cin = cout
        if lowest and cfg.level_attention:
            layers.append(AttnBlock(cout))
    return layers


class Downsample(nn.Conv2d):
    """Stride-2 3x3 conv; `asymmetric` pads right and bottom only (the taming layout) instead of every side."""

    def __init__(self, ch: int, asymmetric: bool):
        super().__init__(ch, ch, 3, stride=2, padding=0 if asymmetric else 1)
        self.asymmetric = asymmetric

    def forward(self, x):
        return super().forward(F.pad(x, (0, 1, 0, 1)) if self.asymmetric else x)


class Encoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        widths = [cfg.base_width * m for m in cfg.channel_mult]
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)]
        cin = widths[0]
        for i, cout in enumerate(widths):
            lowest = i == len(widths) - 1
            layers += _level(cfg, cin, cout, cfg.num_res_blocks, lowest)
            cin = cout
            if not lowest:
                layers.append(Downsample(cin, cfg.asymmetric_downsample))
        layers += [_mid(cin), *_out(cfg, cin, cfg.latent_dim)]
        self.net = nn.Sequential(*layers)
        self.unit_pixels = cfg.unit_pixels

    def forward(self, x):
        return self.net((x + 1) / 2 if self.unit_pixels else x)


class Decoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        widths = [cfg.base_width * m for m in cfg.channel_mult][::-1]
        cin = widths[0]
        layers: list[nn.Module] = [_norm(cfg.latent_dim)] if cfg.decoder_in_norm else []
        layers += [nn.Conv2d(cfg.latent_dim, cin, 3, padding=1), _mid(cin)]
        for i, cout in enumerate(widths):
            layers += _level(cfg, cin, cout, cfg.decoder_blocks, i == 0)
            cin = cout
            if i < len(widths) - 1:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cin, 3, padding=1)]
        layers += _out(cfg, cin, cfg.in_channels)
        self.net = nn.Sequential(*layers)
        self.unit_pixels = cfg.unit_pixels

    def forward(self, z):
        x = self.net(z)
        return x * 2 - 1 if self.unit_pixels else x


QUANTIZER_CLASSES = {"bae": BinaryQuantizer, "vq": VectorQuantizer, "fsq": FiniteScalarQuantizer}


class Autoencoder(nn.Module):
    """Encoder -> quantizer -> decoder; the quantizer is chosen by `cfg.quantizer`."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = QUANTIZER_CLASSES[cfg.quantizer](cfg)
        self.decoder = Decoder(cfg)

    # The interface every tokenizer offers to the rest of elmgen: integer cell codes in raster order.
    @property
    def code_bits(self) -> int:
        """Bits of one cell code (K): cell codes lie in [0, 2^K)."""
        return self.cfg.code_bits

    @property
    def num_codes(self) -> int:
        """Cell codes this tokenizer can emit: 2^K for the BAE, the codebook size for VQ."""
        return self.cfg.num_codes

    @property
    def default_vocab(self) -> Vocab:
        """The LM vocabulary unless one is asked for: BAE codes in 2 sub-codes (1 when K is odd); VQ and
        FSQ indices are not bit fields, so one sub-code of K bits."""
        return Vocab.split(self.code_bits, 2 if self.cfg.quantizer == "bae" and self.code_bits % 2 == 0 else 1)

    def encode_cells(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> (B, h*w) int64 cell codes (BAE: deterministic binarization)."""
        return self.quantizer.cells(self.encoder(self._checked(x_BCHW)))

    def decode_cells(self, cells_BL: torch.Tensor, height: int, width: int | None = None) -> torch.Tensor:
        """(B, height*width) raster-order cell codes -> images in about [-1, 1] (square if no width);
        the decoder is convolutional, so grids larger than the training images decode too."""
        width = height if width is None else width
        if cells_BL.shape[-1] != height * width:
            raise ElmgenError(f"{cells_BL.shape[-1]} cell codes do not fill a {height}x{width} grid")
        if cells_BL.numel() and (cells_BL.min() < 0 or cells_BL.max() >= self.num_codes):
            raise ElmgenError(
                f"cell codes must lie in [0, {self.num_codes}) for this {self.cfg.quantizer} "
                f"tokenizer; got {int(cells_BL.min())}..{int(cells_BL.max())}"
            )
        return self.decoder(self.quantizer.lookup(cells_BL, height, width))

    def draw_cells(self, x_BCHW: torch.Tensor, uniforms_BRKhw: torch.Tensor) -> torch.Tensor:
        """BAE only: R Bernoulli draws of each image's codes, bit = [u < p]: (B, R, h*w).
        With u = 0.5 everywhere this is the deterministic code."""
        if not isinstance(self.quantizer, BinaryQuantizer):
            raise ElmgenError(f"random code draws need the binary autoencoder, not {self.cfg.quantizer}")
        probs_BKhw = self.quantizer.probs(self.encoder(self._checked(x_BCHW)))
        bits_BRKhw = uniforms_BRKhw < probs_BKhw[:, None]
        return bits_to_cells(bits_BRKhw.flatten(0, 1)).view(*bits_BRKhw.shape[:2], -1)

    def forward(self, x_BCHW: torch.Tensor) -> tuple[torch.Tensor, Quantized]:
        """Training pass: the reconstruction and the quantizer's output (straight-through)."""
        q = self.quantizer(self.encoder(x_BCHW))
        return self.decoder(q.z_BChw), q

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output weight (the adaptive GAN weight compares gradients there)."""
        return self.decoder.net[-1].weight

    def _checked(self, x):
        f = self.cfg.downsample
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels or x.shape[-1] % f or x.shape[-2] % f:
            raise ElmgenError(
                f"tokenizer expects images (B, {self.cfg.in_channels}, H, W) with H, W divisible by {f}, "
                f"got {tuple(x.shape)}"
            )
        return x


def load_tokenizer(path, device="cpu") -> tuple[Autoencoder, dict]:
    """A trained tokenizer (its EMA weights when it kept them) and its checkpoint config."""
    meta = checkpoint.load_config(path)
    if meta.get("kind") not in QUANTIZERS:
        raise ElmgenError(f"{path} is not a tokenizer checkpoint (kind {meta.get('kind')!r})")
    cfg = from_dict(TokenizerConfig, meta["tokenizer"])
    if cfg.quantizer != meta["kind"]:
        raise ElmgenError(f"{path}: checkpoint kind {meta['kind']!r} does not match its quantizer {cfg.quantizer!r}")
    model = Autoencoder(cfg)
    ckpt = checkpoint.resolve(path)
    try:
        model.load_state_dict(release_weights(checkpoint.load_state(ckpt)))
    except RuntimeError as e:
        raise ElmgenError(f"checkpoint {ckpt} does not match its tokenizer config: {str(e).splitlines()[0]}") from None
    meta["fingerprint"] = checkpoint.fingerprint(path)
    meta["path"] = str(ckpt.parent.parent.resolve())
    return model.to(device).eval(), meta


def release_weights(state: dict) -> dict:
    """The tokenizer's weights in a training checkpoint's state (EMA already applied by `load_state`):
    prefixed `tokenizer.` (or `ema.` in checkpoints written before the loop kept the EMA), or unprefixed."""
    for prefix in ("ema.", "tokenizer."):
        picked = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if picked:
            return picked
    return state

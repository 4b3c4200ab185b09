"""Tokenizers: a VQGAN-style conv encoder/decoder around one of three quantizers.

- "bae", the binary autoencoder: per-bit probabilities p = sigmoid(logits), binarized by a Bernoulli
  draw or p > 0.5 with a straight-through gradient; the K bits map back to the latent width as the
  sum of one learned embedding per active bit.
- "vq": nearest-neighbour lookup in a codebook of l2-normalised low-dimensional codes (as in
  LlamaGen), codebook and commitment losses, straight-through gradient.
- "fsq": finite scalar quantization, a few channels each rounded to a fixed number of levels.

All three offer the rest of elmgen one interface: integer cell codes in [0, 2^code_bits), raster
order (`encode_cells` / `decode_cells`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from elmgen.errors import ElmgenError
from elmgen.vocab import Vocab, bits_to_cells, cells_to_bits

QUANTIZERS = ("bae", "vq", "fsq")


@dataclass
class TokenizerConfig:
    in_channels: int = 1  # 1 grey, 3 RGB
    base_width: int = 64  # channels of the first level
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])  # one per level; levels-1 downsamplings
    num_res_blocks: int = 1  # ResBlocks per level
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
        if self.codebook_size < 2 or self.code_dim < 1:
            raise ElmgenError("vq needs codebook_size >= 2 and code_dim >= 1")
        if not self.fsq_levels or min(self.fsq_levels) < 2:
            raise ElmgenError(f"fsq_levels needs at least one channel of 2 or more levels, not {self.fsq_levels}")
        if self.num_bits < 1 or self.code_bits > 62:
            raise ElmgenError(f"cell codes need between 1 and 62 bits; this {self.quantizer} needs {self.code_bits}")


def training_memory_gb(cfg: TokenizerConfig, image_size: int, batch_size: int) -> float:
    """Estimated peak memory (GB) of one fp32 training step, dominated by what the backward pass keeps: about
    7 tensors (input, norms, activations, convolutions) for each of the 2 * num_res_blocks + 3 blocks per level
    (encoder, decoder, resampling) at that level's width and side, and the (h w)^2 attention scores and
    probabilities of the two middle blocks. Within 10% of measured CPU peaks from 64 to 256 px."""
    sides = [image_size / 2**i for i in range(len(cfg.channel_mult))]
    per_level = [cfg.base_width * m * side**2 for m, side in zip(cfg.channel_mult, sides, strict=True)]
    convs = 7 * (2 * cfg.num_res_blocks + 3) * sum(per_level)
    attention = 4 * (sides[-1] ** 2) ** 2
    return batch_size * (convs + attention) * 4 / 1e9


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


class Quantized(NamedTuple):
    z_BChw: torch.Tensor  # what the decoder reads; carries the straight-through gradient to the encoder
    loss: torch.Tensor  # the quantizer's own training loss (0 when it has none)
    cells_BL: torch.Tensor  # integer cell codes, raster order


def binarize(probs: torch.Tensor, mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """{0,1} bits from probabilities, with a straight-through gradient to `probs`."""
    if mode == "bernoulli":
        hard = torch.bernoulli(probs.detach(), generator=generator)
    else:
        hard = (probs.detach() > 0.5).to(probs.dtype)
    return straight_through(hard, probs)


def straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Exactly `hard` in value ((hard - soft) + soft would round), with the gradient of `soft`."""
    return hard.detach() + (soft - soft.detach())


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
    def _nearest(self, u_BDhw: torch.Tensor) -> torch.Tensor:
        """(B, h*w) indices of the most similar codes; fp32, in row chunks (all rows x all codes can be GBs)."""
        u_ND = u_BDhw.flatten(2).transpose(1, 2).reshape(-1, u_BDhw.shape[1])
        codes_DS = F.normalize(self.codebook.weight.float(), dim=1).T.contiguous()  # 2x faster than a .T view
        chunk = max(1, (1 << 22) // codes_DS.shape[1])
        with torch.autocast(u_ND.device.type, enabled=False):
            idx_N = torch.cat([(u @ codes_DS).argmax(1) for u in u_ND.split(chunk)])
        return idx_N.view(u_BDhw.shape[0], -1)

    def _codes(self, cells_BL: torch.Tensor, h: int, w: int) -> torch.Tensor:
        q_BLD = F.normalize(self.codebook(cells_BL).float(), dim=-1)
        return q_BLD.transpose(1, 2).reshape(cells_BL.shape[0], -1, h, w)

    def forward(self, z_BChw: torch.Tensor) -> Quantized:
        u_BDhw = self._unit_latents(z_BChw)
        cells_BL = self._nearest(u_BDhw)
        q_BDhw = self._codes(cells_BL, *u_BDhw.shape[-2:])
        # The codebook term pulls codes to the latents; the commitment term keeps the encoder near its codes.
        loss = F.mse_loss(q_BDhw, u_BDhw.detach()) + self.commit_weight * F.mse_loss(u_BDhw, q_BDhw.detach())
        return Quantized(self.proj_out(straight_through(q_BDhw, u_BDhw)), loss, cells_BL)

    def cells(self, z_BChw: torch.Tensor) -> torch.Tensor:
        return self._nearest(self._unit_latents(z_BChw))

    def lookup(self, cells_BL: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.proj_out(self._codes(cells_BL, h, w))


class FiniteScalarQuantizer(nn.Module):
    """d channels, each squashed to [0, L_i - 1] and rounded; the cell code is the mixed-radix number
    of the d digits, the first channel most significant."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        levels = cfg.fsq_levels
        radix = [math.prod(levels[i + 1:]) for i in range(len(levels))]
        self.register_buffer("levels", torch.tensor(levels)[:, None, None], persistent=False)
        self.register_buffer("radix", torch.tensor(radix)[:, None], persistent=False)
        self.proj_in = nn.Conv2d(cfg.latent_dim, len(levels), 1)
        self.proj_out = nn.Conv2d(len(levels), cfg.latent_dim, 1)

    def _digits(self, z_BChw: torch.Tensor) -> torch.Tensor:
        """(B, d, h, w) digits in [0, L_i - 1], rounded with a straight-through gradient."""
        soft = (torch.tanh(self.proj_in(z_BChw).float()) + 1) * ((self.levels - 1) / 2)
        return straight_through(soft.round(), soft)

    def _latent(self, digits_Bdhw: torch.Tensor) -> torch.Tensor:
        return self.proj_out(digits_Bdhw * (2 / (self.levels - 1)) - 1)

    def _cells(self, digits_Bdhw: torch.Tensor) -> torch.Tensor:
        return (digits_Bdhw.detach().long().flatten(2) * self.radix).sum(1)

    def forward(self, z_BChw: torch.Tensor) -> Quantized:
        digits = self._digits(z_BChw)
        return Quantized(self._latent(digits), z_BChw.new_zeros(()), self._cells(digits))

    def cells(self, z_BChw: torch.Tensor) -> torch.Tensor:
        return self._cells(self._digits(z_BChw))

    def lookup(self, cells_BL: torch.Tensor, h: int, w: int) -> torch.Tensor:
        digits_BdL = cells_BL[:, None] // self.radix % self.levels[..., 0]
        return self._latent(digits_BdL.float().view(cells_BL.shape[0], -1, h, w))


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
            raise ElmgenError(f"cell codes must lie in [0, {self.num_codes}) for this {self.cfg.quantizer} "
                              f"tokenizer; got {int(cells_BL.min())}..{int(cells_BL.max())}")
        return self.decoder(self.quantizer.lookup(cells_BL, height, width))

    def draw_cells(self, x_BCHW: torch.Tensor, uniforms_BDKhw: torch.Tensor) -> torch.Tensor:
        """BAE only: D Bernoulli draws of each image's codes, bit = [u < p]: (B, D, h*w).
        With u = 0.5 everywhere this is the deterministic code."""
        if not isinstance(self.quantizer, BinaryQuantizer):
            raise ElmgenError(f"random code draws need the binary autoencoder, not {self.cfg.quantizer}")
        probs_BKhw = self.quantizer.probs(self.encoder(self._checked(x_BCHW)))
        bits_BDKhw = uniforms_BDKhw < probs_BKhw[:, None]
        return bits_to_cells(bits_BDKhw.flatten(0, 1)).view(*bits_BDKhw.shape[:2], -1)

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
    from elmgen import checkpoint
    from elmgen.config import from_dict

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
        picked = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if picked:
            return picked
    return state

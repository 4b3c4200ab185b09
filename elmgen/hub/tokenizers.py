"""Released tokenizers as elmgen autoencoders: ELM's binary autoencoders (`binaryae_ema.th`) and LlamaGen's VQ
tokenizer (`vq_ds16_c2i.pt`, the tensors under its "model" key).

Every size comes from the tensors; where the official layouts differ from elmgen's default one, a
TokenizerConfig option says so, and the weights map one module to one module in forward order (the official
attention's separate q, k, v convs become elmgen's one qkv conv). The result loads strictly into
`Autoencoder(cfg)`.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from elmgen.errors import ElmgenError
from elmgen.tokenizers.autoencoder import AttnBlock, Autoencoder, Downsample, ResBlock
from elmgen.tokenizers.config import TokenizerConfig

Tensors = dict[str, torch.Tensor]

# Official tensors the converted tokenizer has no use for.
IGNORED = {
    "elm_bae": ("generator.logsigma.",),  # an ELBO head fitted after training; decoding never runs it
    "llamagen_vq": ("quantize.codebook_used",),  # a training-time buffer of recent code indices
}


def tokenizer_layout(state: Tensors) -> str | None:
    """Which released tokenizer a state dict holds: "elm_bae", "llamagen_vq", or None (e.g. a GPT)."""
    keys = _elm_tensors(state).keys()
    if "encoder.blocks.0.weight" in keys and "quantize.proj.0.weight" in keys:
        return "elm_bae"
    if "encoder.conv_in.weight" in keys and "quantize.embedding.weight" in keys:
        return "llamagen_vq"
    return None


def elm_bae(state: Tensors, *, deterministic: bool) -> tuple[TokenizerConfig, Tensors]:
    """An ELM binary autoencoder (its `ae.`-prefixed keys, or the bare autoencoder's) as an elmgen BAE.
    Bernoulli vs deterministic training is not in the tensors, so the caller says which release it is. ELM's
    nets see pixels in [0, 1] (its data is ToTensor() only), elmgen's images are in [-1, 1]: `unit_pixels`."""
    sd = _elm_tensors(state)
    enc, dec = _numbered(sd, "encoder.blocks"), _numbered(sd, "generator.blocks")
    logits_KC = _tensor(sd, "quantize.proj.0.weight")
    bae = dict(
        quantizer="bae", num_bits=logits_KC.shape[0], binarization="deterministic" if deterministic else "bernoulli"
    )
    conv = _Converter(sd, "elm_bae", enc, dec, out_silu=False, unit_pixels=True, **bae)
    conv.pair("quantize.proj.0", "quantizer.to_logits")
    # ELM sums one embedding row per active bit with no bias: elmgen's 1x1 conv with a zero bias.
    embed_CK = conv.expected["quantizer.embed.weight"][:2]
    conv.take("quantize.embed.weight", "quantizer.embed.weight", lambda t: t.T[..., None, None], embed_CK[::-1])
    conv.out["quantizer.embed.bias"] = torch.zeros(embed_CK[0], dtype=logits_KC.dtype)
    return conv.cfg, conv.finish()


def llamagen_vq(state: Tensors) -> tuple[TokenizerConfig, Tensors]:
    """LlamaGen's VQ tokenizer (VQ-16 or VQ-8, l2-normalised codebook) as an elmgen VQ tokenizer."""
    sd = dict(state)
    enc, dec = _llamagen_sequence(sd, "encoder"), _llamagen_sequence(sd, "decoder")
    E, Q = _tensor(sd, "quantize.embedding.weight").shape
    conv = _Converter(sd, "llamagen_vq", enc, dec, quantizer="vq", codebook_size=E, code_dim=Q)
    conv.pair("quant_conv", "quantizer.proj_in")
    conv.pair("post_quant_conv", "quantizer.proj_out")
    conv.take("quantize.embedding.weight", "quantizer.codebook.weight")
    return conv.cfg, conv.finish()


def _elm_tensors(state: Tensors) -> Tensors:
    """ELM's training files hold the autoencoder under `ae.` beside the discriminator (its loader keeps `ae.*`)."""
    picked = {k[3:]: v for k, v in state.items() if k.startswith("ae.")}
    return picked or dict(state)


def _tensor(sd: Tensors, key: str) -> torch.Tensor:
    if key not in sd:
        raise ElmgenError(f"tensor {key} is missing; is this an unmodified released tokenizer file?")
    return sd[key]


def _numbered(sd: Tensors, prefix: str) -> list[str]:
    """The `prefix.0`, `prefix.1`, ... module prefixes present in a state dict, in order."""
    found = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    indices = sorted({int(m.group(1)) for k in sd if (m := found.match(k))})
    return [f"{prefix}.{i}" for i in indices]


def _llamagen_sequence(sd: Tensors, part: str) -> list[str]:
    """LlamaGen's encoder or decoder modules in forward order (its levels keep ResBlocks and attention apart)."""
    mid = [f"{part}.mid.{i}" for i in range(3)]
    levels = []
    for level in _numbered(sd, f"{part}.conv_blocks"):
        for res in _numbered(sd, f"{level}.res"):
            attn = res.replace(".res.", ".attn.")
            levels += [res, attn] if f"{attn}.q.weight" in sd else [res]
        levels += [f"{level}.{r}" for r in ("downsample", "upsample") if f"{level}.{r}.conv.weight" in sd]
    body = levels + mid if part == "encoder" else mid + levels
    return [f"{part}.conv_in", *body, f"{part}.norm_out", f"{part}.conv_out"]


def _kind(sd: Tensors, prefix: str) -> str:
    """What an official module is, from its tensor names: res, attn, resample (a conv inside), conv or norm."""
    for sub, kind in (("norm1", "res"), ("q", "attn"), ("conv", "resample")):
        if f"{prefix}.{sub}.weight" in sd:
            return kind
    return "conv" if _tensor(sd, f"{prefix}.weight").ndim == 4 else "norm"


def _levels(sd: Tensors, seq: list[str]) -> list[list[str]]:
    """The ResBlock prefixes of each resolution level, split at the resampling modules."""
    levels: list[list[str]] = [[]]
    for prefix in seq:
        kind = _kind(sd, prefix)
        if kind == "resample":
            levels.append([])
        elif kind == "res":
            levels[-1].append(prefix)
    return levels


def _sizes(sd: Tensors, enc: list[str], dec: list[str]) -> dict:
    """The TokenizerConfig sizes an official encoder and decoder determine (their structure is checked later,
    module by module, against the elmgen autoencoder these sizes build)."""
    if len(enc) < 6 or len(dec) < 6:
        raise ElmgenError(f"the encoder has {len(enc)} and the decoder {len(dec)} modules; a tokenizer has more")
    width, in_channels = _tensor(sd, f"{enc[0]}.weight").shape[:2]
    enc_levels = _levels(sd, enc[1:-5])  # the middle (Res, Attn, Res) and the output norm and conv end it
    dec_start = 2 if _kind(sd, dec[0]) == "norm" else 1
    dec_levels = _levels(sd, dec[dec_start + 3 : -2])
    if not all(enc_levels) or not all(dec_levels):
        raise ElmgenError("a level of the encoder or decoder has no ResBlocks; is this a released tokenizer file?")
    mult = []
    for level in enc_levels:
        out = _tensor(sd, f"{level[-1]}.conv2.weight").shape[0]
        if out % width:
            raise ElmgenError(f"{level[-1]}.conv2.weight has {out} channels, not a multiple of the base {width}")
        mult.append(out // width)
    blocks, dec_blocks = len(enc_levels[0]), len(dec_levels[0])
    attention = any(_kind(sd, p) == "attn" for p in enc[1:-5] + dec[dec_start + 3 : -2])
    return dict(
        in_channels=in_channels,
        base_width=width,
        channel_mult=mult,
        num_res_blocks=blocks,
        latent_dim=_tensor(sd, f"{enc[-1]}.weight").shape[0],
        decoder_res_blocks=0 if dec_blocks == blocks + 1 else dec_blocks,
        level_attention=attention,
        decoder_in_norm=dec_start == 2,
    )


def _elmgen_sequence(module: nn.Module, prefix: str) -> list[tuple[str, str]]:
    """(prefix, kind) of elmgen's encoder or decoder modules that hold weights, in forward order."""
    seq, prev = [], None
    for name, child in module.named_children():
        path = f"{prefix}.{name}"
        if isinstance(child, nn.Sequential):
            seq += _elmgen_sequence(child, path)
        elif isinstance(child, (ResBlock, AttnBlock, Downsample, nn.GroupNorm)):
            kind = {ResBlock: "res", AttnBlock: "attn", Downsample: "resample", nn.GroupNorm: "norm"}[type(child)]
            seq.append((path, kind))
        elif isinstance(child, nn.Conv2d):  # after an upsampling it is the upsampler's conv
            seq.append((path, "resample" if isinstance(prev, nn.Upsample) else "conv"))
        prev = child
    return seq


class _Converter:
    """Builds the elmgen tokenizer an official encoder and decoder describe and fills its state dict from the
    official tensors, checking each against the shape elmgen expects."""

    def __init__(self, sd: Tensors, layout: str, enc: list[str], dec: list[str], **options):
        # Both official layouts downsample the taming way; `options` are the quantizer's and the layout's own.
        self.cfg = TokenizerConfig(**_sizes(sd, enc, dec), asymmetric_downsample=True, **options)
        self.model = Autoencoder(self.cfg)  # for its names and shapes (on "meta", torch's first init takes 5 s)
        self.sd, self.layout = sd, layout
        self.expected = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        self.out: Tensors = {}
        self.used: set[str] = set()
        self.modules(enc, "encoder")
        self.modules(dec, "decoder")

    def take(self, src: str, dst: str, transform=lambda t: t, shape: tuple | None = None) -> None:
        t = _tensor(self.sd, src)
        shape = self.expected[dst] if shape is None else tuple(shape)
        if tuple(t.shape) != shape:
            raise ElmgenError(f"tensor {src} has shape {tuple(t.shape)}, expected {shape} for this {self.layout}")
        self.out[dst] = transform(t).contiguous()
        self.used.add(src)

    def modules(self, official: list[str], part: str) -> None:
        ours = _elmgen_sequence(getattr(self.model, part), part)
        if len(ours) != len(official):
            raise ElmgenError(
                f"the {self.layout} {part} has {len(official)} modules; one elmgen can build has {len(ours)}"
            )
        for src, (dst, kind) in zip(official, ours, strict=True):
            found = _kind(self.sd, src)
            if found != kind:
                raise ElmgenError(f"{src} looks like a {found!r} module where the {self.layout} layout has {kind!r}")
            getattr(self, f"_{kind}")(src, dst)

    def pair(self, src: str, dst: str) -> None:
        for n in ("weight", "bias"):
            self.take(f"{src}.{n}", f"{dst}.{n}")

    _conv = _norm = pair

    def _resample(self, src: str, dst: str) -> None:
        self.pair(f"{src}.conv", dst)

    def _res(self, src: str, dst: str) -> None:
        for n in ("norm1", "conv1", "norm2", "conv2"):
            self.pair(f"{src}.{n}", f"{dst}.{n}")
        # ELM builds a 1x1 `conv_out` in every ResBlock and uses it only when the width changes; LlamaGen
        # builds `nin_shortcut` only then.
        skip = next((f"{src}.{n}" for n in ("nin_shortcut", "conv_out") if f"{src}.{n}.weight" in self.sd), None)
        if f"{dst}.skip.weight" in self.expected:
            self.pair(skip or f"{src}.nin_shortcut", f"{dst}.skip")
        elif skip:
            self.used.update((f"{skip}.weight", f"{skip}.bias"))

    def _attn(self, src: str, dst: str) -> None:
        self.pair(f"{src}.norm", f"{dst}.norm")
        self.pair(f"{src}.proj_out", f"{dst}.proj")
        for n in ("weight", "bias"):
            qkv = self.expected[f"{dst}.qkv.{n}"]
            one = (qkv[0] // 3, *qkv[1:])
            for part in "qkv":
                self.take(f"{src}.{part}.{n}", f"{dst}.{part}.{n}", shape=one)
            self.out[f"{dst}.qkv.{n}"] = torch.cat([self.out.pop(f"{dst}.{p}.{n}") for p in "qkv"])

    def finish(self) -> Tensors:
        left = sorted(k for k in self.sd if k not in self.used and not k.startswith(IGNORED[self.layout]))
        if left:
            more = f" (and {len(left) - 1} more)" if len(left) > 1 else ""
            raise ElmgenError(f"tensor {left[0]}{more} has no place in an elmgen {self.layout}; is the file modified?")
        missing = sorted(set(self.expected) - set(self.out))
        if missing:
            raise ElmgenError(f"the {self.layout} state dict gives no value for elmgen's {missing[0]}")
        return self.out

"""Released checkpoints as elmgen run folders: the weights and config.json that every elmgen command loads,
and a model card (README.md) saying what the model is, where it came from and under which licence."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from elmgen.checkpoint import CheckpointMeta, has_checkpoint, save_checkpoint
from elmgen.config import to_dict
from elmgen.errors import ElmgenError
from elmgen.hub.files import read_state_dict
from elmgen.hub.gpt import elm_gpt, llamagen_gpt
from elmgen.hub.tokenizers import elm_bae, llamagen_vq, tokenizer_layout
from elmgen.io import atomic_write_text
from elmgen.tokenizers import load_tokenizer
from elmgen.vocab import Vocab


@dataclass(frozen=True)
class Source:
    name: str
    code: str  # the official code
    hub: str  # the Hugging Face repository of the released files
    licence: str  # as the source states it


SOURCES = {
    "llamagen": Source(
        "LlamaGen",
        "https://github.com/FoundationVision/LlamaGen",
        "FoundationVision/LlamaGen",
        "MIT (the LICENSE file of github.com/FoundationVision/LlamaGen)",
    ),
    "elm": Source(
        "ELM",
        "https://github.com/Pepper-lll/LMforImageGeneration",
        "xuantonglll/ELM",
        "not stated: github.com/Pepper-lll/LMforImageGeneration has no LICENSE file; ask the authors before "
        "redistributing",
    ),
}
CONVERT_GPT = {"llamagen": llamagen_gpt, "elm": elm_gpt}
TOKENIZER_LAYOUT = {"llamagen": "llamagen_vq", "elm": "elm_bae"}


def is_gpt(state: dict) -> bool:
    return any(re.fullmatch(r"layers\.\d+\.attention\.wqkv\.weight", k) for k in state)


def import_checkpoint(
    source: str,
    file: str | Path,
    out: str | Path,
    *,
    tokenizer: str | Path | None = None,
    n_head: int | None = None,
    image_size: int = 256,
    deterministic: bool = False,
) -> Path:
    """Convert a released file of `source` ("llamagen" or "elm") into the run folder `out`: a tokenizer (for
    images of `image_size` px; an ELM BAE `deterministic` or Bernoulli), or a GPT, which samples with the imported
    tokenizer run `tokenizer` (whose grid and bits it must match)."""
    if has_checkpoint(out):  # before reading a multi-GB file
        raise ElmgenError(f"{out} already holds a checkpoint; pass a new folder")
    state = read_state_dict(file)
    layout = tokenizer_layout(state)
    if layout is not None:
        if layout != TOKENIZER_LAYOUT[source]:
            other = next(k for k, v in TOKENIZER_LAYOUT.items() if v == layout)
            raise ElmgenError(f"{file} is {SOURCES[other].name}'s tokenizer; import it with 'elmgen import {other}'")
        return import_tokenizer(source, file, state, out, image_size, deterministic)
    if not is_gpt(state):
        raise ElmgenError(
            f"{file} is neither a {SOURCES[source].name} tokenizer nor a GPT checkpoint (it has no "
            "layers.<i>.attention.wqkv.weight)"
        )
    if tokenizer is None:
        raise ElmgenError("a GPT file needs --tokenizer RUN: the imported tokenizer run it samples with")
    _, tok_meta = load_tokenizer(tokenizer)
    cfg, weights = CONVERT_GPT[source](state, grid_size=tok_meta["grid"], n_head=n_head)
    vocab = Vocab.parse(cfg.vocab)
    codes, tok_codes = cfg.num_codes or 2**vocab.bits, tok_meta.get("num_codes") or 2 ** tok_meta["bits"]
    if (vocab.bits, codes) != (tok_meta["bits"], tok_codes):
        raise ElmgenError(
            f"{file} predicts {codes} codes of {vocab.bits} bits (vocabulary {vocab}) but the tokenizer "
            f"{tok_meta['path']} makes {tok_codes} codes of {tok_meta['bits']} bits; pass the tokenizer the model "
            "was trained with"
        )
    codes_meta = {
        "tokenizer": tok_meta["path"],
        "tokenizer_fingerprint": tok_meta["fingerprint"],
        **{k: tok_meta.get(k) for k in ("kind", "bits", "num_codes", "grid", "image_size")},
        "vocab": cfg.vocab,
        "num_classes": cfg.num_classes,
        "imported_from": Path(file).name,
    }
    meta = CheckpointMeta(kind="lm", model=to_dict(cfg), codes=codes_meta)
    return write_run(out, weights, meta, model_card(source, file, meta))


def import_tokenizer(source: str, file, state: dict, out, image_size: int, deterministic: bool) -> Path:
    cfg, weights = elm_bae(state, deterministic=deterministic) if source == "elm" else llamagen_vq(state)
    if image_size % cfg.downsample:
        raise ElmgenError(f"image size {image_size} is not a multiple of the tokenizer's downsampling {cfg.downsample}")
    meta = CheckpointMeta(
        kind=cfg.quantizer,
        tokenizer=to_dict(cfg),
        bits=cfg.code_bits,
        num_codes=cfg.num_codes,
        image_size=image_size,
        channels=cfg.in_channels,
        grid=image_size // cfg.downsample,
    )
    return write_run(out, weights, meta, model_card(source, file, meta))


def write_run(out: str | Path, weights: dict, meta: CheckpointMeta, card: str) -> Path:
    out = Path(out)
    save_checkpoint(out, 0, weights, meta, keep=1)
    atomic_write_text(out / "README.md", card)
    return out


def model_card(source: str, file: str | Path, meta: CheckpointMeta) -> str:
    s, name = SOURCES[source], Path(file).name
    return card(
        f"{name}: {s.name}'s {what_of(meta.kind)}, imported into elmgen",
        [
            f"source: `{name}` as released on https://huggingface.co/{s.hub} (code: {s.code})",
            f"licence, as the source states it: {s.licence}",
            f"imported with `elmgen import {source} {name}`: the released weights, renamed and reshaped for "
            "elmgen's own modules (docs/pretrained.md says how the import was checked against the official code)",
        ],
        meta.model if meta.kind == "lm" else meta.tokenizer,
    )


def model_card_of(run: str | Path, meta: dict) -> str:
    """A run's model card: the one its import wrote, else one for a model elmgen trained."""
    written = Path(run) / "README.md"
    if written.is_file():
        return written.read_text()
    data = (meta.get("codes") or {}).get("dataset") or (meta.get("data") or {}).get("source") or "not recorded"
    return card(
        f"{Path(run).resolve().name}: an elmgen {what_of(meta['kind'])}",
        [
            f"source: trained with elmgen (https://arxiv.org/abs/2410.16257 describes the method), data: {data}",
            "licence: none stated; the licence of its training data applies",
        ],
        meta.get("model") if meta["kind"] == "lm" else meta.get("tokenizer"),
    )


def what_of(kind: str) -> str:
    return "language model" if kind == "lm" else f"{kind} tokenizer"


def card(title: str, facts: list[str], config: dict | None) -> str:
    lines = "".join(f"- {fact}\n" for fact in facts)
    return f"# {title}\n\n{lines}\n## Config\n\n```json\n{json.dumps(config, indent=2)}\n```\n"

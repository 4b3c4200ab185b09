"""The released generators as elmgen transformers: LlamaGen's c2i GPTs, ELM's AR and MLM GPTs.

All three are Llama blocks like elmgen's (same RMSNorm, fused q/k/v, SwiGLU hidden rule, 2-D RoPE with row
then column halves of interleaved pairs, null class at index num_classes). What differs is set by ModelConfig
options: the class token's rotary embedding is zero (`class_rope="zero"`: its query and key vanish), and ELM's
MLMs score logits against their input table through a BERT-style head (`head="tied"`). A single token table
(LlamaGen, ELM 1-c) has no input projection: it is imported as the identity.

Each function infers the config from the tensors' names and shapes; the grid size is in no tensor of an AR
model (the tokenizer gives it) and the head count in none at all (the known sizes give it, else `n_head`).
"""

from __future__ import annotations

import re

import torch

from elmgen.errors import ElmgenError
from elmgen.models import PRESETS, ModelConfig, Transformer

CLS = "cls_embedding.embedding_table.weight"
BLOCK = {  # official name inside layers.i -> elmgen name inside blocks.i
    "attention.wqkv.weight": "attn.wqkv.weight",
    "attention.wo.weight": "attn.wo.weight",
    "attention_norm.weight": "attn_norm.weight",
    "feed_forward.w1.weight": "mlp.w1.weight",
    "feed_forward.w2.weight": "mlp.w2.weight",
    "feed_forward.w3.weight": "mlp.w3.weight",
    "ffn_norm.weight": "mlp_norm.weight",
}
# Tensors the official forward never reads: an old LlamaGen buffer, ELM MLM's learned-position table (rope2d
# models never add it) and its linear output layer (its tied MLM head scores instead).
UNUSED = {"freqs_cis", "pos_embed.weight", "output.weight"}


RELEASED_SIZES = ("B", "L", "XL", "XXL", "2B", "3B")  # the presets of the released models


def heads_of(n_layer: int, d_model: int, n_head: int | None) -> int:
    """The head count: given, or that of the released size with these layers and width."""
    if n_head is not None:
        return n_head
    for name in RELEASED_SIZES:
        if (PRESETS[name]["n_layer"], PRESETS[name]["d_model"]) == (n_layer, d_model):
            return PRESETS[name]["n_head"]
    raise ElmgenError(
        f"{n_layer} layers of width {d_model} is none of the released sizes ({', '.join(RELEASED_SIZES)}): "
        "the file does not say its attention heads; pass --heads"
    )


def tensor(sd: dict, name: str, what: str) -> torch.Tensor:
    if name not in sd:
        raise ElmgenError(f"the {what} file has no tensor {name}; pass a {what} checkpoint")
    return sd[name]


def count_layers(sd: dict, what: str) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.fullmatch(r"layers\.(\d+)\..+", k))}
    if not found or found != set(range(len(found))):
        raise ElmgenError(f"the {what} file's layers.<i> tensors are not numbered 0..n-1 (found {sorted(found)[:8]})")
    return len(found)


def numbered(sd: dict, stem: str) -> list[str]:
    """`stem`.0.weight, `stem`.1.weight, ... (ELM's per-sub-code tables and heads), or [`stem`.weight]."""
    names = []
    while f"{stem}.{len(names)}.weight" in sd:
        names.append(f"{stem}.{len(names)}.weight")
    return names or [f"{stem}.weight"]


def stacked(sd: dict, names: list[str], what: str) -> torch.Tensor:
    """Tables of one shape concatenated along their rows (elmgen keeps a model's n tables and heads fused)."""
    first = tensor(sd, names[0], what)
    for name in names[1:]:
        if tensor(sd, name, what).shape != first.shape:
            raise ElmgenError(f"tensor {name} has shape {tuple(sd[name].shape)}; expected {tuple(first.shape)}")
    return torch.cat([sd[name] for name in names])


def power_of_two(entries: int, name: str) -> int:
    bits = entries.bit_length() - 1
    if entries < 2 or entries != 2**bits:
        raise ElmgenError(f"tensor {name} has {entries} rows; expected a power of two (the 2^c values of c bits)")
    return bits


def released_config(sd: dict, what: str, d: int, grid_size: int, n_head: int | None, **options) -> ModelConfig:
    """What all three share: layers counted, heads looked up, classes from the class table (less the null
    class), the class token unrotated; `options` set the rest."""
    n_layer = count_layers(sd, what)
    return ModelConfig(
        n_layer=n_layer,
        d_model=d,
        n_head=heads_of(n_layer, d, n_head),
        grid_size=grid_size,
        num_classes=tensor(sd, CLS, what).shape[0] - 1,
        dropout=0.0,
        class_rope="zero",
        **options,
    )


def renamed(sd: dict, cfg: ModelConfig, names: dict[str, str]) -> tuple[dict, dict]:
    """The tensors under elmgen names (the blocks' and `names`: elmgen name -> official), and the official
    name of each elmgen tensor."""
    sources = {f"blocks.{i}.{new}": f"layers.{i}.{old}" for i in range(cfg.n_layer) for old, new in BLOCK.items()}
    sources.update({"cls_emb.weight": CLS, "norm.weight": "norm.weight", **names})
    out = {new: sd[old] for new, old in sources.items() if old in sd}
    out["tok_proj.weight"] = torch.eye(cfg.d_model, dtype=sd[CLS].dtype)  # one table: no projection
    return out, sources


def checked(
    cfg: ModelConfig, out: dict, sources: dict, sd: dict, what: str, used: tuple[str, ...] = ()
) -> tuple[ModelConfig, dict]:
    """`out` if it is exactly the state of a Transformer(cfg): every tensor present, of its shape, and no
    official tensor left over (`sources` names the official tensor of each elmgen one, `used` the others read);
    else one line naming the tensor."""
    cfg.validate()
    with torch.device("meta"):
        expected = {k: v.shape for k, v in Transformer(cfg).state_dict().items()}
    for key, shape in expected.items():
        name = sources.get(key, key)
        if key not in out:
            raise ElmgenError(f"the {what} file has no tensor {name}; pass a complete {what} checkpoint")
        if out[key].shape != shape:
            raise ElmgenError(
                f"tensor {name} has shape {tuple(out[key].shape)}; expected {tuple(shape)} "
                f"({cfg.n_layer} layers, width {cfg.d_model}, vocabulary {cfg.vocab}, {cfg.num_classes} classes)"
            )
    left = sorted(set(sd) - set(sources.values()) - set(used) - UNUSED)
    if left:
        raise ElmgenError(
            f"tensor {left[0]} of the {what} file has no place in elmgen's transformer "
            f"({len(left)} such); was it trained with options the released models do not use (adaLN, t2i, ...)?"
        )
    return cfg, out


def llamagen_gpt(sd: dict, *, grid_size: int, n_head: int | None = None) -> tuple[ModelConfig, dict]:
    """LlamaGen's class-conditional GPT: one VQ code per cell (vocabulary 1-K, its codebook size valid codes)."""
    what = "LlamaGen c2i GPT"
    codes, d = tensor(sd, "tok_embeddings.weight", what).shape
    bits = max(1, (codes - 1).bit_length())
    cfg = released_config(
        sd, what, d, grid_size, n_head, vocab=f"1-{bits}", num_codes=codes if codes < 2**bits else None
    )
    out, sources = renamed(sd, cfg, {"tok_emb.weight": "tok_embeddings.weight", "head.weight": "output.weight"})
    # A codebook smaller than 2^K: the table and head get rows for the entries that are no code (never predicted).
    for key in ("tok_emb.weight", "head.weight"):
        if key in out and out[key].shape[0] == codes < 2**bits:
            out[key] = torch.cat([out[key], out[key].new_zeros(2**bits - codes, d)])
    return checked(cfg, out, sources, sd, what)


def elm_gpt(sd: dict, *, grid_size: int, n_head: int | None = None) -> tuple[ModelConfig, dict]:
    """ELM's AR GPT (n sub-code tables, projection and heads) or, when it has an `mlm_layer`, its MLM GPT."""
    if any(k.startswith("mlm_layer.") for k in sd):
        return elm_mlm(sd, grid_size=grid_size, n_head=n_head)
    what = "ELM AR GPT"
    tables, heads = numbered(sd, "tok_embedder"), numbered(sd, "output")
    entries, d = tensor(sd, tables[0], what).shape
    cfg = released_config(sd, what, d, grid_size, n_head, vocab=f"{len(tables)}-{power_of_two(entries, tables[0])}")
    out, sources = renamed(sd, cfg, {"tok_emb.weight": tables[0], "head.weight": heads[0]})
    out["tok_emb.weight"], out["head.weight"] = stacked(sd, tables, what), stacked(sd, heads, what)
    if len(tables) > 1:
        out["tok_proj.weight"], sources["tok_proj.weight"] = tensor(sd, "proj.weight", what), "proj.weight"
    return checked(cfg, out, sources, sd, what, used=(*tables, *heads))


def elm_mlm(sd: dict, *, grid_size: int, n_head: int | None = None) -> tuple[ModelConfig, dict]:
    """ELM's MLM GPT: one table of 2^c codes plus the mask entry, the tied MLM head, bidirectional attention."""
    what = "ELM MLM GPT"
    if "proj.weight" in sd:
        raise ElmgenError(
            "this ELM MLM splits each cell into several sub-codes, each at its own sequence position, which "
            "elmgen's transformer does not do; the released MLMs (vocabulary 1-16) import"
        )
    entries, d = tensor(sd, "tok_embedder.weight", what).shape
    bits = power_of_two(entries - 1, "tok_embedder.weight (less its mask entry)")
    cells = sd["pos_embed.weight"].shape[0] if "pos_embed.weight" in sd else grid_size**2  # unused, maybe absent
    if cells != grid_size**2:
        raise ElmgenError(
            f"tensor pos_embed.weight has {cells} rows: the model runs on {cells} cells, not the "
            f"tokenizer's {grid_size}x{grid_size}; pass the tokenizer it was trained with"
        )
    cfg = released_config(sd, what, d, grid_size, n_head, vocab=f"1-{bits}", kind="mlm", head="tied")
    names = {"tok_emb.weight": "tok_embedder.weight", "head.bias": "mlm_layer.bias"}
    for part in ("fc.weight", "fc.bias", "ln.weight", "ln.bias"):
        names[f"head.{part}"] = f"mlm_layer.{part}"
    out, sources = renamed(sd, cfg, names)
    bias = tensor(sd, "mlm_layer.bias", what)
    if bias.shape != (1, 1, entries):
        raise ElmgenError(f"tensor mlm_layer.bias has shape {tuple(bias.shape)}; expected (1, 1, {entries})")
    out["head.bias"] = bias.reshape(1, entries)[:, :-1]  # the mask entry is never predicted
    return checked(cfg, out, sources, sd, what)

"""Llama-style transformer over factorized image tokens, class-conditional, with a KV cache.

Sequence layout: position 0 is the class token (the null class num_classes drives unconditional
guidance), position p >= 1 is grid cell p-1 in raster order. Each cell carries n sub-codes; their
embeddings are concatenated and projected to the model width, and n heads (one fused matrix)
predict n sub-codes from the same hidden state.

One transformer serves both model kinds: "ar" attends causally and position p predicts cell p
(the next cell); "mlm" attends both ways, sees every cell (masked ones as a mask entry appended to
each sub-code table) and position p >= 1 predicts cell p-1 itself.

Two options make the released models (LlamaGen, ELM: docs/pretrained.md) configs of this one transformer:
`class_rope="zero"` (the class token's query and key are zeroed by its rotary row) and `head="tied"` (ELM's
BERT-style MLM head, scoring against the input tables).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from elmgen import checkpoint
from elmgen.config import from_dict
from elmgen.errors import ElmgenError
from elmgen.models.kv_cache import KVCache
from elmgen.vocab import Vocab

LOGITS_CHUNK = 2**23  # logits (entries) the training cross-entropy holds at a time: 32 MB in fp32, 16 MB in bf16


@dataclass
class ModelConfig:
    n_layer: int = 4  # transformer blocks
    d_model: int = 256  # width
    n_head: int = 4  # attention heads (head width d_model / n_head)
    vocab: str = "2-8"  # n-c: n sub-codes of c bits per grid cell
    grid_size: int = 8  # the token grid is grid_size x grid_size
    num_classes: int = 10  # class labels (one more embedding: the null class)
    dropout: float = 0.0  # on token embeddings, residual branches and MLP
    class_dropout: float = 0.1  # training labels replaced by the null class (enables guidance)
    rope_base: float = 10000.0  # 2-D rotary embedding base
    norm_eps: float = 1e-5  # RMSNorm epsilon
    mlp_multiple_of: int = 256  # SwiGLU hidden = smallest multiple of this >= 8*d/3
    kind: str = "ar"  # "ar": causal, raster order; "mlm": bidirectional over masked cells (MaskGIT)
    num_codes: int | None = None  # valid cell codes when fewer than 2^K (a VQ/FSQ code space); None: all
    class_rope: str = "identity"  # the class token's rotary embedding: "identity" (none) or "zero" (its query
    # and key become zero, so every position gives it the score 0: LlamaGen's and ELM's released models)
    head: str = "linear"  # "linear": one output matrix per sub-code; "tied": fc, GELU, LayerNorm, then scores
    # against each sub-code's embedding table plus a bias (BERT-style: ELM's released MLMs)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def vocabulary(self) -> Vocab:
        return Vocab.parse(self.vocab)

    @property
    def num_cells(self) -> int:
        return self.grid_size**2

    @property
    def mlp_hidden(self) -> int:
        m = self.mlp_multiple_of
        return m * math.ceil(int(8 * self.d_model / 3) / m)

    def validate(self) -> None:
        small = [
            f"{k}={getattr(self, k)}"
            for k in ("n_layer", "d_model", "n_head", "grid_size", "num_classes")
            if getattr(self, k) < 1
        ]
        if small:
            raise ElmgenError(f"model sizes must be at least 1, not {', '.join(small)}")
        choices_of = {"kind": ("ar", "mlm"), "class_rope": ("identity", "zero"), "head": ("linear", "tied")}
        for key, choices in choices_of.items():
            if getattr(self, key) not in choices:
                raise ElmgenError(f"model.{key} must be one of {', '.join(choices)}, not {getattr(self, key)!r}")
        vocab = self.vocabulary
        if self.num_codes is not None and self.num_codes < 2**vocab.bits and vocab.num_subcodes > 1:
            raise ElmgenError(
                f"a code space of {self.num_codes} codes (not a power of two) needs one sub-code "
                f"per cell: use vocabulary 1-{vocab.bits}"
            )
        if self.d_model % self.n_head:
            raise ElmgenError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.head_dim % 4:
            raise ElmgenError(f"head dim {self.head_dim} must be divisible by 4 for 2-D RoPE")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_2d(positions_T2: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, head_dim/2): half the rotated pairs follow the row, half the column."""
    quarter = head_dim // 4
    freqs = base ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    angles = torch.cat([positions_T2[:, :1] * freqs, positions_T2[:, 1:] * freqs], dim=-1)
    return angles.cos().float(), angles.sin().float()


def sequence_positions(grid_size: int) -> torch.Tensor:
    """(1 + L, 2) (row, col) per sequence position; the class token gets (0, 0), an identity rotation."""
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    cells = torch.stack([rows.flatten(), cols.flatten()], -1).double()
    return torch.cat([torch.zeros(1, 2, dtype=torch.float64), cells])


def apply_rope(x_BATe: torch.Tensor, cos_Tp: torch.Tensor, sin_Tp: torch.Tensor) -> torch.Tensor:
    x = x_BATe.float().unflatten(-1, (-1, 2))
    x0, x1 = x[..., 0], x[..., 1]
    out = torch.stack([x0 * cos_Tp - x1 * sin_Tp, x0 * sin_Tp + x1 * cos_Tp], dim=-1)
    return out.flatten(-2).type_as(x_BATe)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.head_dim, self.causal = cfg.n_head, cfg.head_dim, cfg.kind == "ar"
        self.wqkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.wo = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x_BTd, cos, sin, pos_T: torch.Tensor, cache: KVCache | None):
        B, T, _ = x_BTd.shape
        q, k, v = self.wqkv(x_BTd).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:  # a query at position p sees the cached keys at positions <= p (unwritten slots lie beyond)
            k, v = cache.update(pos_T, k, v)
            mask_TS = torch.arange(k.shape[2], device=pos_T.device) <= pos_T[:, None]
            # Plain matmuls: the fused attention kernels are built for long query blocks, not for the one or
            # few queries of a decode step (docs/performance.md, sampling).
            scores_BATS = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
            out = scores_BATS.masked_fill(~mask_TS, float("-inf")).softmax(-1) @ v
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.w3 = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.w2 = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.w2(self.drop(F.silu(self.w1(x)) * self.w3(x)))


class TiedHead(nn.Module):
    """Logits from the hidden state through fc, GELU and LayerNorm, scored against the input embedding tables."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln = nn.LayerNorm(cfg.d_model)
        self.bias = nn.Parameter(torch.zeros(cfg.vocabulary.num_subcodes, cfg.vocabulary.size))

    def forward(self, h_BTd: torch.Tensor, tables_nVd: torch.Tensor) -> torch.Tensor:
        x_BTd = self.ln(F.gelu(self.fc(h_BTd)))
        return torch.einsum("btd,nvd->btnv", x_BTd, tables_nVd) + self.bias


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(cfg.d_model, cfg.norm_eps), Attention(cfg)
        self.mlp_norm, self.mlp = RMSNorm(cfg.d_model, cfg.norm_eps), SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, pos_T, cache):
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, pos_T, cache))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class Transformer(nn.Module):
    """Class-conditional image-token transformer, autoregressive or masked (`cfg.kind`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        vocab = cfg.vocabulary
        self.n_sub, self.vocab_size = vocab.num_subcodes, vocab.size
        self.mask_index = vocab.size  # MLM input entry of a masked sub-code (never predicted)
        table = vocab.size + (cfg.kind == "mlm")
        d = cfg.d_model
        self.cls_emb = nn.Embedding(cfg.num_classes + 1, d)  # last row: the null class
        self.tok_emb = nn.Embedding(self.n_sub * table, d)  # n tables stacked
        self.tok_proj = nn.Linear(self.n_sub * d, d, bias=False)
        self.tok_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(d, cfg.norm_eps)
        self.table_size = table
        if cfg.head == "tied":
            self.head = TiedHead(cfg)
        else:
            self.head = nn.Linear(d, self.n_sub * self.vocab_size, bias=False)  # n heads fused
        self.register_buffer("sub_offsets", torch.arange(self.n_sub) * table, persistent=False)
        # Entries that are no cell code (a VQ/FSQ code space smaller than 2^K) can never be predicted.
        smaller = cfg.num_codes is not None and cfg.num_codes < self.vocab_size
        self.register_buffer(
            "invalid_V", torch.arange(self.vocab_size) >= cfg.num_codes if smaller else None, persistent=False
        )
        cos, sin = rope_2d(sequence_positions(cfg.grid_size), cfg.head_dim, cfg.rope_base)
        if cfg.class_rope == "zero":
            cos[0], sin[0] = 0.0, 0.0
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)
        if cfg.head == "linear":
            nn.init.zeros_(self.head.weight)
        self.activation_checkpointing = False  # training: keep only block inputs, recompute the rest

    @property
    def fsdp_units(self) -> list[nn.Module]:
        """Submodules sharded on their own under FSDP (one all-gather per block)."""
        return list(self.blocks)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def embed_cells(self, sub_BTn: torch.Tensor) -> torch.Tensor:
        emb_BTnd = self.tok_emb(sub_BTn + self.sub_offsets)
        return self.tok_proj(emb_BTnd.flatten(2))

    def _trunk(self, h_BTd, pos_T: torch.Tensor, caches) -> torch.Tensor:
        """The blocks and the final norm: the hidden states (B, T, d) that the heads read."""
        cos, sin = self.rope_cos[pos_T], self.rope_sin[pos_T]
        h_BTd = self.tok_drop(h_BTd)
        for i, block in enumerate(self.blocks):
            if self.activation_checkpointing and self.training:
                h_BTd = torch.utils.checkpoint.checkpoint(block, h_BTd, cos, sin, pos_T, None, use_reentrant=False)
            else:
                h_BTd = block(h_BTd, cos, sin, pos_T, None if caches is None else caches[i])
        return self.norm(h_BTd)

    def logits(self, h_BTd: torch.Tensor) -> torch.Tensor:
        """The n sub-code heads on hidden states: (B, T, n, V), entries that are no code at -inf."""
        if self.cfg.head == "tied":  # each sub-code's table without its mask entry
            out_BTnV = self.head(h_BTd, self.tok_emb.weight.view(self.n_sub, self.table_size, -1)[:, : self.vocab_size])
        else:
            out_BTnV = self.head(h_BTd).unflatten(-1, (self.n_sub, self.vocab_size))
        return out_BTnV if self.invalid_V is None else out_BTnV.masked_fill(self.invalid_V, float("-inf"))

    def hidden(self, labels_B: torch.Tensor, sub_BTn: torch.Tensor, caches=None) -> torch.Tensor:
        """Hidden states (B, 1+T, d) at the class token and the T given cells: what `logits` reads.

        AR: T <= L-1 cells, teacher forcing. MLM: all L cells, masked sub-codes set to `mask_index`.
        """
        if self.training and self.cfg.class_dropout > 0:
            drop = torch.rand(labels_B.shape, device=labels_B.device) < self.cfg.class_dropout
            labels_B = torch.where(drop, torch.full_like(labels_B, self.null_class), labels_B)
        h_BTd = torch.cat([self.cls_emb(labels_B)[:, None], self.embed_cells(sub_BTn)], dim=1)
        return self._trunk(h_BTd, torch.arange(h_BTd.shape[1], device=h_BTd.device), caches)

    def forward(
        self,
        labels_B: torch.Tensor,
        sub_BTn: torch.Tensor,
        caches=None,
        targets_BLn: torch.Tensor | None = None,
        scored_BL: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, 1+T, n, V) at the class token and the T given cells (inputs as for `hidden`).

        With `targets_BLn` (the sequences' cells), instead the training loss: the mean cross-entropy of the
        cells' sub-codes marked in `scored_BL` (all when None), each at the position that predicts it
        (`at_cells`), by `cross_entropy` in chunks. Inside forward, so that compiled, DDP and FSDP models compute
        it as part of their forward pass.
        """
        h_BTd = self.hidden(labels_B, sub_BTn, caches)
        if targets_BLn is None:
            return self.logits(h_BTd)
        h_BLd = self.at_cells(h_BTd)
        if scored_BL is None:
            return self.cross_entropy(h_BLd.flatten(0, 1), targets_BLn.flatten(0, 1))
        return self.cross_entropy(h_BLd[scored_BL], targets_BLn[scored_BL])

    def at_cells(self, out_BT: torch.Tensor) -> torch.Tensor:
        """The positions of a forward pass's output (hidden states or logits) that predict the cells, in cell
        order: AR all of them (position t predicts cell t), MLM all but the class token (t + 1 holds cell t)."""
        return out_BT if self.cfg.kind == "ar" else out_BT[:, 1:]

    def cross_entropy(self, h_Nd: torch.Tensor, targets_Nn: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy (fp32) of the n sub-codes of N cells from their hidden states. At most about
        LOGITS_CHUNK logits exist at a time: a wide head (16,384 entries at vocabulary 1-14) is scored in
        chunks of rows whose logits are recomputed in the backward pass, never for the whole batch at once."""
        rows = max(1, LOGITS_CHUNK // (self.n_sub * self.vocab_size))
        if rows >= len(h_Nd):
            return chunk_nats(self.logits, h_Nd, targets_Nn) / targets_Nn.numel()
        total = sum(
            torch.utils.checkpoint.checkpoint(
                chunk_nats, self.logits, h_Nd[i : i + rows], targets_Nn[i : i + rows], use_reentrant=False
            )
            for i in range(0, len(h_Nd), rows)
        )
        return total / targets_Nn.numel()

    def decode_step(self, sub_B1n: torch.Tensor, pos_1: torch.Tensor, caches) -> torch.Tensor:
        """Logits (B, 1, n, V) after feeding one cell at sequence position pos_1 (a 1-element tensor,
        so that every step has the same shapes), using the cache."""
        return self.logits(self._trunk(self.embed_cells(sub_B1n), pos_1, caches))

    def bf16_linears(self) -> Transformer:
        """Store every linear layer's weight in bfloat16, in place (embeddings, norms and RoPE tables stay fp32).
        Under bf16 autocast this computes exactly what fp32 weights do, since autocast would round each weight to
        the same bfloat16 copy, but without holding both copies: for inference only (`elmgen sample
        --precision bf16`); outside autocast the model no longer runs."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.to(torch.bfloat16)
        return self

    def new_caches(self, batch: int, dtype: torch.dtype | None = None) -> nn.ModuleList:
        """Empty KV caches, in the weights' dtype unless given (bfloat16 under bf16 autocast)."""
        p = self.norm.weight
        return nn.ModuleList(
            KVCache(batch, self.cfg.n_head, self.cfg.num_cells, self.cfg.head_dim, dtype or p.dtype, p.device)
            for _ in self.blocks
        )


def chunk_nats(logits, h_Nd: torch.Tensor, targets_Nn: torch.Tensor) -> torch.Tensor:
    """The summed cross-entropy (fp32 nats) of the heads `logits` on hidden states (N, d) against (N, n) sub-codes."""
    return F.cross_entropy(logits(h_Nd).float().flatten(0, 1), targets_Nn.flatten(), reduction="sum")


def load_model(path, device="cpu", ema: bool = True) -> tuple[Transformer, dict]:
    """A trained language model (its EMA weights if it kept them, unless `ema` is off) and its checkpoint
    config (which names its code files and its tokenizer, as a path)."""
    meta = checkpoint.load_config(path)
    if meta.get("kind") != "lm":
        raise ElmgenError(f"{path} is not a language-model checkpoint (kind {meta.get('kind')!r})")
    if isinstance(meta.get("codes"), dict) and "tokenizer" in meta["codes"]:
        meta["codes"]["tokenizer"] = str(tokenizer_path(path, meta))
    model = Transformer(from_dict(ModelConfig, meta["model"]))
    checkpoint.load_weights(path, model, ema)
    return model.to(device).eval(), meta


def tokenizer_path(path, meta: dict) -> Path:
    """The tokenizer an LM checkpoint's config names: a relative name (an exported model's bundled tokenizer)
    lies in the checkpoint's folder."""
    name = Path(meta["codes"]["tokenizer"])
    return name if name.is_absolute() else checkpoint.resolve(path) / name

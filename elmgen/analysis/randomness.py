"""How random image tokens are, next to text.

A token stream is read as grids (N, h, w): image codes in raster layout, text as one row, so
an image token's neighbours are its left and upper cells and a text token's is the previous token (text
has no upper neighbour). All entropies are plug-in estimates in nats from the empirical counts; a
conditional entropy H(x | context) = H(context, x) - H(context) is biased low when contexts are seen only
a few times each, so every row also says how many samples each distinct context had on average.
KL from uniform = ln V - H for single tokens and 2 ln V - H(pair) for neighbour pairs, V being the
vocabulary the tokens are drawn from (used or not).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from scipy.stats import entropy as plugin_entropy

from elmgen import checkpoint
from elmgen.codes import CodeDataset
from elmgen.errors import ElmgenError
from elmgen.io import atomic_write_text
from elmgen.plots import pyplot, save_figure
from elmgen.vocab import Vocab, cells_to_subcodes


def _joint_ids(*columns: np.ndarray) -> np.ndarray:
    """One dense integer per distinct tuple of the aligned columns (joint categories of any code width)."""
    ids = np.zeros(len(columns[0]), dtype=np.int64)
    for col in columns:
        _, col_ids = np.unique(col, return_inverse=True)
        _, ids = np.unique(ids * (int(col_ids.max()) + 1) + col_ids, return_inverse=True)  # both < N: no overflow
    return ids.reshape(-1)


def joint_entropy(*columns: np.ndarray) -> float:
    """Plug-in entropy (nats) of the empirical joint distribution of aligned token columns."""
    return float(plugin_entropy(np.bincount(_joint_ids(*columns))))


def conditional_entropy(target: np.ndarray, *contexts: np.ndarray) -> tuple[float, float] | tuple[None, None]:
    """(H(target | contexts) in nats, samples per distinct context); (None, None) without samples."""
    if target.size == 0:
        return None, None
    ctx_ids = _joint_ids(*(c.reshape(-1) for c in contexts))
    h_ctx = float(plugin_entropy(np.bincount(ctx_ids)))
    return joint_entropy(ctx_ids, target.reshape(-1)) - h_ctx, target.size / (int(ctx_ids.max()) + 1)


def token_statistics(tokens_Nhw: np.ndarray, vocab_size: int) -> dict:
    """Unigram and raster-neighbour statistics of token grids (N, h, w) drawn from `vocab_size` entries."""
    x = np.asarray(tokens_Nhw)
    ln_v = math.log(vocab_size)
    h1 = joint_entropy(x.reshape(-1))
    # neighbour pairs (context, token): left neighbours, then upper ones, pooled
    ctx = np.concatenate([x[:, :, :-1].reshape(-1), x[:, :-1, :].reshape(-1)])
    tok = np.concatenate([x[:, :, 1:].reshape(-1), x[:, 1:, :].reshape(-1)])
    h_left, per_left = conditional_entropy(x[:, :, 1:], x[:, :, :-1])
    h_up, per_up = conditional_entropy(x[:, 1:, :], x[:, :-1, :])
    h_both, per_both = conditional_entropy(x[:, 1:, 1:], x[:, 1:, :-1], x[:, :-1, 1:])
    return {
        "vocab_size": vocab_size,
        "tokens": int(x.size),
        "usage": len(np.unique(x)) / vocab_size,
        "entropy": h1,
        "kl_uniform": ln_v - h1,
        "kl_uniform_norm": (ln_v - h1) / ln_v,
        "pair_kl_uniform": 2 * ln_v - joint_entropy(ctx, tok) if tok.size else None,
        "cond_entropy_left": h_left,
        "cond_entropy_up": h_up,
        "cond_entropy_left_up": h_both,
        "samples_per_context_left": per_left,
        "samples_per_context_up": per_up,
        "samples_per_context_left_up": per_both,
    }


def code_space_size(meta: dict) -> int:
    """Cell codes a code folder's tokenizer can emit (an FSQ or VQ code space need not be a power of two):
    the folder's own record, else its tokenizer checkpoint's (older folders), else 2^K."""
    if meta.get("num_codes") is not None:
        return int(meta["num_codes"])
    try:
        return int(checkpoint.load_config(meta["tokenizer"])["num_codes"])
    except (ElmgenError, KeyError, OSError):
        return 2 ** meta["bits"]


def code_streams(codes_dir, limit: int | None = None) -> list[tuple[str, np.ndarray, int]]:
    """(name, token grids (N, h, w), vocabulary size) of a code folder: each sub-code of its default
    vocabulary split (when it has more than one) and the whole cell code. First draw, first `limit` rows."""
    codes = CodeDataset(codes_dir)
    meta, name = codes.meta, Path(codes_dir).name
    grid, vocab = meta["grid"], Vocab.parse(meta["vocab"])
    cells_NL = torch.from_numpy(codes.codes[slice(limit)].astype(np.int64))
    cells_Nhw = cells_NL.reshape(-1, grid, grid).numpy()
    streams = [(f"{name} cell ({meta['kind']}, K={meta['bits']})", cells_Nhw, code_space_size(meta))]
    if vocab.num_subcodes > 1:
        sub_Nhwn = cells_to_subcodes(cells_NL, vocab).reshape(-1, grid, grid, vocab.num_subcodes).numpy()
        streams += [
            (f"{name} sub-code {j + 1}/{vocab.num_subcodes} ({vocab})", sub_Nhwn[..., j], vocab.size)
            for j in range(vocab.num_subcodes)
        ]
    return streams


def bpe_tokens(text: str, vocab_size: int) -> tuple[np.ndarray, int]:
    """Token ids of `text` under a byte-level BPE vocabulary of at most `vocab_size` entries trained on
    `text` itself (Hugging Face `tokenizers`), and the vocabulary's actual size."""
    try:
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    except ImportError:
        raise ElmgenError(
            "the BPE text baseline needs the 'tokenizers' package: pip install 'elmgen[analysis]'"
        ) from None
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    lines = text.splitlines(keepends=True)
    tokenizer.train_from_iterator(lines, trainer)
    ids = np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in tokenizer.encode_batch(lines)])
    return ids, tokenizer.get_vocab_size()


def text_streams(paths: list, bpe_vocab: int) -> list[tuple[str, np.ndarray, int]]:
    """(name, tokens as one row (1, 1, T), vocabulary size) of text files read as one corpus: its bytes
    (V = 256) and its BPE tokens."""
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise ElmgenError(f"text files not found: {', '.join(missing)}")
    data = b"\n".join(Path(p).read_bytes() for p in paths)
    ids, size = bpe_tokens(data.decode("utf-8", errors="replace"), bpe_vocab)
    return [
        ("text bytes", np.frombuffer(data, dtype=np.uint8)[None, None], 256),
        (f"text BPE-{size}", ids[None, None], size),
    ]


RANDOMNESS_COLUMNS = (  # (key, Markdown header)
    ("vocab_size", "V"),
    ("tokens", "tokens"),
    ("usage", "usage"),
    ("entropy", "H"),
    ("kl_uniform", "KL(p‖U)"),
    ("kl_uniform_norm", "KL / ln V"),
    ("pair_kl_uniform", "pair KL(p‖U)"),
    ("cond_entropy_left", "H(x|left)"),
    ("cond_entropy_up", "H(x|up)"),
    ("cond_entropy_left_up", "H(x|left,up)"),
    ("samples_per_context_left_up", "samples/context (left,up)"),
)


def randomness_markdown(rows: list[dict]) -> str:
    def cell(v):
        return "–" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:.3f}"

    head = ["source"] + [h for _, h in RANDOMNESS_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([r["source"]] + [cell(r[k]) for k, _ in RANDOMNESS_COLUMNS]) + " |" for r in rows]
    return "\n".join(lines) + "\n\nEntropies and KL in nats; usage: share of the V entries that occur.\n"


def analyze_randomness(
    out_dir, codes_dirs=(), text_files=(), bpe_vocab: int = 4096, limit: int | None = None
) -> list[dict]:
    """randomness.json, randomness.md and randomness.png in `out_dir` for code folders and a text corpus."""
    if not codes_dirs and not text_files:
        raise ElmgenError("give at least one code folder (--codes) or text file (--text)")
    if text_files and bpe_vocab < 256:  # byte-level BPE starts from the 256 bytes: fewer would silently be 256
        raise ElmgenError(f"--bpe-vocab must be at least 256 (the byte alphabet BPE starts from), not {bpe_vocab}")
    streams = [s for d in codes_dirs for s in code_streams(d, limit)]
    if text_files:
        streams += text_streams(list(text_files), bpe_vocab)
    rows = [{"source": name, **token_statistics(tokens, size)} for name, tokens, size in streams]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "randomness.json", json.dumps(rows, indent=2))
    atomic_write_text(out / "randomness.md", randomness_markdown(rows))
    plot_randomness(rows, out / "randomness.png")
    return rows


def plot_randomness(rows: list[dict], path) -> None:
    """Left: KL from uniform of tokens and of neighbour pairs. Right: entropies as a share of ln V
    (1 = uniformly random), alone and given the neighbours."""
    plt = pyplot()
    fig, (ax_kl, ax_h) = plt.subplots(1, 2, figsize=(12, 0.55 * len(rows) + 2), dpi=110)
    y = np.arange(len(rows))

    def bars(ax, series):
        width = 0.8 / len(series)
        for i, (label, values) in enumerate(series):
            ax.barh(
                y + (i - (len(series) - 1) / 2) * width,
                [np.nan if v is None else v for v in values],
                height=width,
                label=label,
            )
        ax.set_yticks(y, [r["source"] for r in rows])
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=8)

    bars(ax_kl, [("token", [r["kl_uniform"] for r in rows]), ("neighbour pair", [r["pair_kl_uniform"] for r in rows])])
    ax_kl.set_xlabel("KL divergence from uniform (nats)")
    ln = [math.log(r["vocab_size"]) for r in rows]
    bars(
        ax_h,
        [
            (label, [None if r[k] is None else r[k] / v for r, v in zip(rows, ln, strict=True)])
            for label, k in (
                ("H(x)", "entropy"),
                ("H(x | left)", "cond_entropy_left"),
                ("H(x | left, up)", "cond_entropy_left_up"),
            )
        ],
    )
    ax_h.set_xlabel("entropy / ln V (1 = uniformly random)")
    ax_h.tick_params(labelleft=False)
    fig.tight_layout()
    save_figure(fig, path)

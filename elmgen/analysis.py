"""The paper's analyses as numbers: how random image tokens are next to text, where a model's attention
looks, and how far the training loss falls.

Randomness. A token stream is read as grids (N, h, w): image codes in raster layout, text as one row, so
an image token's neighbours are its left and upper cells and a text token's is the previous token (text
has no upper neighbour). All entropies are plug-in estimates in nats from the empirical counts; a
conditional entropy H(x | context) = H(context, x) - H(context) is biased low when contexts are seen only
a few times each, so every row also says how many samples each distinct context had on average.
KL from uniform = ln V - H for single tokens and 2 ln V - H(pair) for neighbour pairs, V being the
vocabulary the tokens are drawn from (used or not).

Attention. Forward hooks on every `Attention` module recompute the attention probabilities from the
module's input with its own weights and RoPE; the model's computation is not touched. Sequence position
p >= 1 carries grid cell p-1 (the cell whose RoPE position it has), so the distance between a query and a
key is the Euclidean distance of their cells, in cells; position 0 is the class token. All figures are
linear in the attention map except the mean distance (a ratio of sums), so they are computed from the
attention map averaged over the analysed sequences.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.stats import entropy as plugin_entropy

from elmgen import checkpoint
from elmgen.errors import ElmgenError
from elmgen.model import Attention, Transformer, apply_rope, count_params, load_model, sequence_positions
from elmgen.plots import pyplot, save_figure
from elmgen.training import read_metrics
from elmgen.vocab import Vocab, cells_to_subcodes

# ---------------------------------------------------------------------------------------------------------
# Token randomness


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


def token_statistics(tokens_NHW: np.ndarray, vocab_size: int) -> dict:
    """Unigram and raster-neighbour statistics of token grids (N, h, w) drawn from `vocab_size` entries."""
    x = np.asarray(tokens_NHW)
    ln_v = math.log(vocab_size)
    h1 = joint_entropy(x.reshape(-1))
    # neighbour pairs (context, token): left neighbours, then upper ones, pooled
    ctx = np.concatenate([x[:, :, :-1].reshape(-1), x[:, :-1, :].reshape(-1)])
    tok = np.concatenate([x[:, :, 1:].reshape(-1), x[:, 1:, :].reshape(-1)])
    h_left, per_left = conditional_entropy(x[:, :, 1:], x[:, :, :-1])
    h_up, per_up = conditional_entropy(x[:, 1:, :], x[:, :-1, :])
    h_both, per_both = conditional_entropy(x[:, 1:, 1:], x[:, 1:, :-1], x[:, :-1, 1:])
    return {
        "vocab_size": vocab_size, "tokens": int(x.size), "usage": len(np.unique(x)) / vocab_size,
        "entropy": h1, "kl_uniform": ln_v - h1, "kl_uniform_norm": (ln_v - h1) / ln_v,
        "pair_kl_uniform": 2 * ln_v - joint_entropy(ctx, tok) if tok.size else None,
        "cond_entropy_left": h_left, "cond_entropy_up": h_up, "cond_entropy_left_up": h_both,
        "samples_per_context_left": per_left, "samples_per_context_up": per_up,
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
    from elmgen.codes import CodeDataset

    codes = CodeDataset(codes_dir)
    meta, name = codes.meta, Path(codes_dir).name
    grid, vocab = meta["grid"], Vocab.parse(meta["vocab"])
    cells_NL = torch.from_numpy(codes.codes[slice(limit)].astype(np.int64))
    cells_NHW = cells_NL.reshape(-1, grid, grid).numpy()
    streams = [(f"{name} cell ({meta['kind']}, K={meta['bits']})", cells_NHW, code_space_size(meta))]
    if vocab.num_subcodes > 1:
        sub_NHWn = cells_to_subcodes(cells_NL, vocab).reshape(-1, grid, grid, vocab.num_subcodes).numpy()
        streams += [(f"{name} sub-code {j + 1}/{vocab.num_subcodes} ({vocab})", sub_NHWn[..., j], vocab.size)
                    for j in range(vocab.num_subcodes)]
    return streams


def bpe_tokens(text: str, vocab_size: int) -> tuple[np.ndarray, int]:
    """Token ids of `text` under a byte-level BPE vocabulary of at most `vocab_size` entries trained on
    `text` itself (Hugging Face `tokenizers`), and the vocabulary's actual size."""
    try:
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    except ImportError:
        raise ElmgenError("the BPE text baseline needs the 'tokenizers' package: "
                          "pip install 'elmgen[analysis]'") from None
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
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
    return [("text bytes", np.frombuffer(data, dtype=np.uint8)[None, None], 256),
            (f"text BPE-{size}", ids[None, None], size)]


RANDOMNESS_COLUMNS = (  # (key, Markdown header)
    ("vocab_size", "V"), ("tokens", "tokens"), ("usage", "usage"), ("entropy", "H"), ("kl_uniform", "KL(p‖U)"),
    ("kl_uniform_norm", "KL / ln V"), ("pair_kl_uniform", "pair KL(p‖U)"), ("cond_entropy_left", "H(x|left)"),
    ("cond_entropy_up", "H(x|up)"), ("cond_entropy_left_up", "H(x|left,up)"),
    ("samples_per_context_left_up", "samples/context (left,up)"),
)


def randomness_markdown(rows: list[dict]) -> str:
    def cell(v):
        return "–" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:.3f}"

    head = ["source"] + [h for _, h in RANDOMNESS_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([r["source"]] + [cell(r[k]) for k, _ in RANDOMNESS_COLUMNS]) + " |" for r in rows]
    return "\n".join(lines) + "\n\nEntropies and KL in nats; usage: share of the V entries that occur.\n"


def analyze_randomness(out_dir, codes_dirs=(), text_files=(), bpe_vocab: int = 4096,
                       limit: int | None = None) -> list[dict]:
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
    checkpoint.atomic_write_text(out / "randomness.json", json.dumps(rows, indent=2))
    checkpoint.atomic_write_text(out / "randomness.md", randomness_markdown(rows))
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
            ax.barh(y + (i - (len(series) - 1) / 2) * width, [np.nan if v is None else v for v in values],
                    height=width, label=label)
        ax.set_yticks(y, [r["source"] for r in rows])
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=8)

    bars(ax_kl, [("token", [r["kl_uniform"] for r in rows]), ("neighbour pair", [r["pair_kl_uniform"] for r in rows])])
    ax_kl.set_xlabel("KL divergence from uniform (nats)")
    ln = [math.log(r["vocab_size"]) for r in rows]
    bars(ax_h, [(label, [None if r[k] is None else r[k] / v for r, v in zip(rows, ln, strict=True)])
                for label, k in (("H(x)", "entropy"), ("H(x | left)", "cond_entropy_left"),
                                 ("H(x | left, up)", "cond_entropy_left_up"))])
    ax_h.set_xlabel("entropy / ln V (1 = uniformly random)")
    ax_h.tick_params(labelleft=False)
    fig.tight_layout()
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------------
# Attention


@contextmanager
def capture_attention(model: Transformer):
    """Inside the block, each forward pass of `model` fills the yielded list with one (B, H, T, S) tensor of
    attention probabilities per layer, recomputed from each `Attention` module's input; outputs unchanged."""
    maps: list[torch.Tensor] = []

    def hook(module: Attention, args, output):
        x_BTd, cos, sin, _, cache = args
        if cache is not None:
            raise ElmgenError("attention capture needs a full forward pass, not KV-cached decoding")
        if len(maps) == len(layers):  # a new forward pass
            maps.clear()
        B, T, _ = x_BTd.shape
        q, k, _ = module.wqkv(x_BTd).view(B, T, 3, module.n_head, module.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin).float(), apply_rope(k, cos, sin).float()
        scores_BHTS = q @ k.transpose(-1, -2) / math.sqrt(module.head_dim)
        if module.causal:
            future_TS = torch.ones(T, T, dtype=torch.bool, device=x_BTd.device).triu(1)
            scores_BHTS = scores_BHTS.masked_fill(future_TS, float("-inf"))
        maps.append(scores_BHTS.softmax(-1))

    layers = [m for m in model.modules() if isinstance(m, Attention)]
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        yield maps
    finally:
        for h in handles:
            h.remove()


def cell_distances(grid: int) -> torch.Tensor:
    """(L, L) Euclidean distances between the cells of a grid, in cells (raster order)."""
    xy_L2 = sequence_positions(grid)[1:].float()  # the cells' (row, col), without the class token
    return torch.cdist(xy_L2, xy_L2)


def attention_metrics(attn_HTS: torch.Tensor, grid: int, radii=(1, 2), global_radius: float = 3.0) -> dict:
    """Per-head figures of an attention map (H, T, S) over [class token, cells...], each a list over heads,
    averaged over the cell queries (positions 1..T-1):
    mean_distance: average distance of the attention mass that falls on cells (mass-weighted);
    within_r{r}: share of all attention on cells at distance <= r of the query's cell;
    cls_share: share on the class token; global_share: share on cells farther than `global_radius`."""
    n = attn_HTS.shape[1] - 1
    dist_nn = cell_distances(grid)[:n, :n].to(attn_HTS.device)
    cells_Hnn, cls_Hn = attn_HTS[:, 1:, 1:].double(), attn_HTS[:, 1:, 0].double()
    out = {"mean_distance": ((cells_Hnn * dist_nn).sum((1, 2)) / cells_Hnn.sum((1, 2)).clamp_min(1e-12))}
    for r in radii:
        out[f"within_r{r}"] = (cells_Hnn * (dist_nn <= r)).sum(-1).mean(-1)
    out["cls_share"] = cls_Hn.mean(-1)
    out["global_share"] = (cells_Hnn * (dist_nn > global_radius)).sum(-1).mean(-1)
    return {k: v.tolist() for k, v in out.items()}


def uniform_attention(T: int, causal: bool) -> torch.Tensor:
    """(1, T, T): every query spreads its attention evenly over the positions it may see."""
    allowed_TT = torch.ones(T, T).tril() if causal else torch.ones(T, T)
    return (allowed_TT / allowed_TT.sum(-1, keepdim=True))[None]


@dataclass
class AttentionConfig:
    num_sequences: int = 64  # sequences whose attention is averaged
    sampled: bool = False  # generate the sequences with the model (default sampling rules) instead of real codes
    codes: str | None = None  # code folder of the real sequences (default: the one the model was trained on)
    mask_ratio: float = 0.5  # MLM: share of cells masked in the input, as in training
    queries: list[list[int]] = field(default_factory=list)  # (row, col) cells of the heat-maps; default: two
    radii: list[int] = field(default_factory=lambda: [1, 2])
    global_radius: float = 3.0  # attention on cells farther than this counts as global
    batch_size: int = 32
    seed: int = 0

    def validate(self) -> None:
        if self.num_sequences < 1 or self.batch_size < 1:
            raise ElmgenError("the number of sequences and the batch size must be positive")
        if not 0 < self.mask_ratio < 1:
            raise ElmgenError(f"mask_ratio must be in (0, 1), not {self.mask_ratio}")
        if not self.radii or min(self.radii) < 0 or self.global_radius < 0:
            raise ElmgenError("radii must be a non-empty list of distances >= 0, and the global radius >= 0")


def input_sequences(model: Transformer, meta: dict, cfg: AttentionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (B,) and the sub-codes (B, T, n) the model reads: real rows of a code folder or its own
    samples; AR reads all cells but the last (as in training), MLM all cells with a share masked."""
    mc = model.cfg
    if cfg.sampled:
        from elmgen.sampling import SampleConfig, generate, image_seeds

        labels_B = torch.arange(cfg.num_sequences) % mc.num_classes
        seeds = image_seeds(cfg.seed, labels_B, torch.arange(cfg.num_sequences) // mc.num_classes)
        sub_BLn = torch.cat([generate(model, labels_B[i: i + cfg.batch_size], SampleConfig(seed=cfg.seed),
                                      seeds[i: i + cfg.batch_size])
                             for i in range(0, cfg.num_sequences, cfg.batch_size)])
    else:
        from elmgen.codes import CodeDataset

        codes = CodeDataset(cfg.codes or meta["codes"]["path"])
        if codes.meta["grid"] != mc.grid_size:
            raise ElmgenError(f"{codes.path} holds a {codes.meta['grid']}x{codes.meta['grid']} grid; the model "
                              f"expects {mc.grid_size}x{mc.grid_size}")
        vocab = Vocab.for_bits(mc.vocab, codes.meta["bits"])
        rows = np.random.default_rng(cfg.seed).choice(len(codes), min(cfg.num_sequences, len(codes)), replace=False)
        sub_BLn, labels_B = codes.batch(np.sort(rows), vocab)
    if mc.kind == "ar":
        return labels_B, sub_BLn[:, :-1]
    gen = torch.Generator().manual_seed(cfg.seed)
    masked_BL = torch.rand(sub_BLn.shape[:2], generator=gen) < cfg.mask_ratio
    return labels_B, sub_BLn.masked_fill(masked_BL[..., None], model.mask_index)


@torch.no_grad()
def mean_attention(model: Transformer, labels_B: torch.Tensor, sub_BTn: torch.Tensor,
                   batch_size: int) -> list[torch.Tensor]:
    """Per layer, the attention probabilities (H, T, S) averaged over the sequences."""
    model.eval()
    sums: list[torch.Tensor] = []
    with capture_attention(model) as maps:
        for i in range(0, len(labels_B), batch_size):
            model(labels_B[i: i + batch_size], sub_BTn[i: i + batch_size])
            batch = [m.sum(0) for m in maps]
            sums = batch if not sums else [s + b for s, b in zip(sums, batch, strict=True)]
    return [s / len(labels_B) for s in sums]


def default_queries(grid: int) -> list[list[int]]:
    """The centre cell and the middle of the last row (an AR query there sees almost the whole image)."""
    return [[grid // 2, grid // 2], [grid - 1, grid // 2]]


def model_attention(model: Transformer, meta: dict, cfg: AttentionConfig) -> tuple[dict, list[torch.Tensor]]:
    """The attention report of one model and its per-layer mean maps."""
    mc = model.cfg
    labels_B, sub_BTn = input_sequences(model, meta, cfg)
    maps = mean_attention(model, labels_B, sub_BTn, cfg.batch_size)
    T = maps[0].shape[1]

    def figures(attn_HTS):
        return attention_metrics(attn_HTS, mc.grid_size, cfg.radii, cfg.global_radius)

    layers = []
    for i, attn_HTS in enumerate(maps):
        layer = {k: v[0] for k, v in figures(attn_HTS.mean(0, keepdim=True)).items()}
        layers.append({"layer": i + 1, **layer, "heads": figures(attn_HTS)})
    report = {
        "kind": mc.kind, "n_layer": mc.n_layer, "d_model": mc.d_model, "n_head": mc.n_head,
        "params": count_params(mc), "vocab": mc.vocab, "grid": mc.grid_size, "step": meta.get("step"),
        "sequences": len(labels_B), "source": "sampled" if cfg.sampled else "real",
        "layers": layers, "uniform": {k: v[0] for k, v in figures(uniform_attention(T, mc.kind == "ar")).items()},
    }
    return report, maps


def run_names(paths) -> list[str]:
    """Short distinct names: the folder name, with its parent when two share it."""
    names = [Path(p).name for p in paths]
    return [f"{Path(p).parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names, strict=True)]


def analyze_attention(models: list, out_dir, cfg: AttentionConfig) -> dict:
    """attention.json, attention-depth.png and one attention-<model>.png of heat-maps per model."""
    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reports = {}
    for name, path in zip(run_names(models), models, strict=True):
        model, meta = load_model(path)
        grid = model.cfg.grid_size
        queries = cfg.queries or default_queries(grid)
        bad = [q for q in queries if not (len(q) == 2 and 0 <= min(q) and max(q) < grid)]
        if bad:
            raise ElmgenError(f"query cells {bad} are not (row, col) cells of the {grid}x{grid} grid of {path}")
        report, maps = model_attention(model, meta, cfg)
        plot_heatmaps(maps, grid, queries, model.cfg.kind == "ar", out / f"attention-{name.replace('/', '-')}.png",
                      name)
        reports[name] = {"path": str(path), **report}
    result = {"config": asdict(cfg), "models": reports}
    checkpoint.atomic_write_text(out / "attention.json", json.dumps(result, indent=2))
    plot_depth(reports, out / "attention-depth.png", cfg)
    return result


def plot_heatmaps(maps: list[torch.Tensor], grid: int, queries: list[list[int]], causal: bool, path,
                  title: str) -> None:
    """Rows: layers; columns: query cells (red box); colour: attention (mean over heads and sequences) on
    each cell; the class token's share is in the title. Cells a query cannot see are blank."""
    plt = pyplot()
    fig, axes = plt.subplots(len(maps), len(queries), figsize=(2.3 * len(queries), 2.3 * len(maps)), dpi=110,
                             squeeze=False)
    for li, attn_HTS in enumerate(maps):
        attn_TS = attn_HTS.mean(0)
        n = attn_TS.shape[1] - 1
        for qi, (row, col) in enumerate(queries):
            ax = axes[li, qi]
            pos = row * grid + col + 1
            heat = np.full(grid * grid, np.nan)
            if pos <= n:
                heat[:n] = attn_TS[pos, 1:].numpy()
                if causal:  # cells after the query's own are unseen
                    heat[pos:] = np.nan
            ax.imshow(heat.reshape(grid, grid), cmap="viridis", vmin=0)
            ax.add_patch(plt.Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
            cls = float(attn_TS[pos, 0]) if pos <= n else float("nan")
            ax.set_title(f"layer {li + 1}, cell ({row},{col})\nclass token {cls:.2f}, "
                         f"top cell {np.nanmax(heat, initial=0):.2f}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def plot_depth(reports: dict, path, cfg: AttentionConfig) -> None:
    """Per layer and model: mean attention distance, local share (r = 1), global share; dotted: the same
    figure for uniform attention."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    panels = [("mean_distance", "mean attention distance (cells)"),
              (f"within_r{cfg.radii[0]}", f"share within radius {cfg.radii[0]}"),
              ("global_share", f"share beyond radius {cfg.global_radius:g}"), ("cls_share", "share on class token")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), dpi=110)
    for ci, (name, rep) in enumerate(reports.items()):
        colour = f"C{ci}"
        layers = [lay["layer"] for lay in rep["layers"]]
        for ax, (key, label) in zip(axes, panels, strict=True):
            ax.plot(layers, [lay[key] for lay in rep["layers"]], "o-", color=colour,
                    label=f"{name} ({rep['params'] / 1e6:.2f}M)")
            ax.axhline(rep["uniform"][key], color=colour, ls=":", lw=1)
            ax.set_xlabel("layer")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(label, fontsize=9)
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, title="dotted: uniform attention", title_fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------------
# Loss


def run_losses(path) -> dict:
    """A language-model run's logged losses, its vocabulary and size."""
    from elmgen.config import from_dict
    from elmgen.model import ModelConfig

    ckpt = checkpoint.resolve(path)
    meta = checkpoint.load_config(ckpt)
    if meta.get("kind") != "lm":
        raise ElmgenError(f"{path} is not a language-model run (kind {meta.get('kind')!r})")
    rows = read_metrics(ckpt.parent.parent / "metrics.jsonl")
    if not rows:
        raise ElmgenError(f"{ckpt.parent.parent} has no metrics.jsonl to read losses from")
    cfg = from_dict(ModelConfig, meta["model"])
    ln_v = math.log(cfg.vocabulary.size)
    return {
        "path": str(path), "kind": cfg.kind, "vocab": cfg.vocab, "ln_vocab": ln_v, "params": count_params(cfg),
        "n_layer": cfg.n_layer, "d_model": cfg.d_model, "steps": [r["step"] for r in rows],
        "loss": [r["loss"] for r in rows], "final_step": rows[-1]["step"], "final_loss": rows[-1]["loss"],
        "final_loss_norm": rows[-1]["loss"] / ln_v,
    }


def analyze_loss(runs: list, out_dir) -> dict:
    """loss.json and loss.png: loss / ln V over training for every run, and the final loss against size."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reports = {name: run_losses(p) for name, p in zip(run_names(runs), runs, strict=True)}
    checkpoint.atomic_write_text(out / "loss.json", json.dumps(reports, indent=2))
    plt = pyplot()
    fig, (ax_c, ax_s) = plt.subplots(1, 2, figsize=(11, 3.8), dpi=110)
    for name, r in reports.items():
        label = f"{name}: {r['kind']} {r['vocab']}, {r['params'] / 1e6:.2f}M"
        ax_c.plot(r["steps"], np.asarray(r["loss"]) / r["ln_vocab"], lw=1.5, label=label)
        ax_s.scatter(r["params"], r["final_loss_norm"])
        ax_s.annotate(f"{name} ({r['final_step']} steps)", (r["params"], r["final_loss_norm"]), fontsize=7,
                      xytext=(4, 4), textcoords="offset points")
    ax_c.axhline(1.0, color="grey", ls="--", lw=1, label="ln V (uniform guess)")
    ax_c.set(xlabel="step", ylabel="loss / ln V", title="training loss per sub-code, normalised")
    ax_c.legend(fontsize=7)
    ax_s.set(xscale="log", xlabel="parameters", ylabel="final loss / ln V", title="final loss against model size")
    for ax in (ax_c, ax_s):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out / "loss.png")
    return reports

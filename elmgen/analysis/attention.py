"""Where a model's attention looks, per layer and head.

Forward hooks on every `Attention` module recompute the attention probabilities from the
module's input with its own weights and RoPE; the model's computation is not touched. Sequence position
p >= 1 carries grid cell p-1 (the cell whose RoPE position it has), so the distance between a query and a
key is the Euclidean distance of their cells, in cells; position 0 is the class token. All figures are
linear in the attention map except the mean distance and the far top key (a ratio of sums, an argmax), so
they are computed from the attention map averaged over the analysed sequences.

Far attention is either a sink (mass every query puts on the same fixed position, such as the class token
or the first cell, whatever that position holds) or genuine long-range context: `context_share` is the far
mass off the sink positions, so "attends more globally" is a number a sink cannot raise.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from elmgen.analysis.names import run_names
from elmgen.codes import CodeDataset
from elmgen.errors import ElmgenError
from elmgen.io import atomic_write_text
from elmgen.models import Attention, Transformer, apply_rope, count_params, load_model, sequence_positions
from elmgen.plots import pyplot, save_figure
from elmgen.sampling import SampleConfig, generate, image_seeds
from elmgen.vocab import Vocab


@contextmanager
def capture_attention(model: Transformer):
    """Inside the block, each forward pass of `model` fills the yielded list with one (B, A, T, S) tensor of
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
        scores_BATS = q @ k.transpose(-1, -2) / math.sqrt(module.head_dim)
        if module.causal:
            future_TS = torch.ones(T, T, dtype=torch.bool, device=x_BTd.device).triu(1)
            scores_BATS = scores_BATS.masked_fill(future_TS, float("-inf"))
        maps.append(scores_BATS.softmax(-1))

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


def attention_metrics(
    attn_ATS: torch.Tensor, grid: int, radii=(1, 2), global_radius: float = 3.0, sink_positions=(0, 1)
) -> dict:
    """Per-head figures of an attention map (A, T, S) over [class token, cells...], each a list over heads,
    averaged over the cell queries (positions 1..T-1):
    mean_distance: average distance of the attention mass that falls on cells (mass-weighted);
    within_r{r}: share of all attention on cells at distance <= r of the query's cell;
    cls_share: share on the class token; global_share: share on cells farther than `global_radius`;
    sink_share: share on the (sequence) positions `sink_positions`, near or far;
    context_share: share on cells farther than `global_radius` that are not sink positions;
    far_top_key, far_top_key_share: the position receiving most of the far attention, and its part of it
    (near 1: the far mass is a sink at that position, listed or not; 1 / the far keys for an even spread)."""
    n = attn_ATS.shape[1] - 1
    dist_TS = cell_distances(grid)[:n, :n].to(attn_ATS.device)
    cells_ATS, cls_AT = attn_ATS[:, 1:, 1:].double(), attn_ATS[:, 1:, 0].double()
    sink_S = torch.zeros(n + 1, dtype=torch.bool, device=attn_ATS.device)
    sink_S[[p for p in sink_positions if p <= n]] = True
    far_ATS = cells_ATS * (dist_TS > global_radius)
    far_AS = far_ATS.sum(1)  # the far mass each key cell receives, over all queries
    out = {"mean_distance": ((cells_ATS * dist_TS).sum((1, 2)) / cells_ATS.sum((1, 2)).clamp_min(1e-12))}
    for r in radii:
        out[f"within_r{r}"] = (cells_ATS * (dist_TS <= r)).sum(-1).mean(-1)
    out["cls_share"] = cls_AT.mean(-1)
    out["global_share"] = far_ATS.sum(-1).mean(-1)
    out["sink_share"] = (attn_ATS[:, 1:].double() * sink_S).sum(-1).mean(-1)
    out["context_share"] = (far_ATS * ~sink_S[1:]).sum(-1).mean(-1)
    out["far_top_key"] = far_AS.argmax(-1) + 1
    out["far_top_key_share"] = far_AS.max(-1).values / far_AS.sum(-1).clamp_min(1e-12)
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
    radii: list[int] = field(default_factory=lambda: [1, 2])  # distances (cells) of the local shares
    global_radius: float = 3.0  # attention on cells farther than this counts as global
    sink_positions: list[int] = field(default_factory=lambda: [0, 1])  # sinks: 0 the class token, 1 the first cell
    batch_size: int = 32  # sequences per forward pass
    seed: int = 0  # picks the real rows, the masks and the sample seeds

    def validate(self) -> None:
        if self.num_sequences < 1 or self.batch_size < 1:
            raise ElmgenError("the number of sequences and the batch size must be positive")
        if not 0 < self.mask_ratio < 1:
            raise ElmgenError(f"mask_ratio must be in (0, 1), not {self.mask_ratio}")
        if not self.radii or min(self.radii) < 0 or self.global_radius < 0:
            raise ElmgenError("radii must be a non-empty list of distances >= 0, and the global radius >= 0")
        if min(self.sink_positions, default=0) < 0:
            raise ElmgenError(f"sink_positions {self.sink_positions} must be sequence positions >= 0 (0: class token)")


def input_sequences(model: Transformer, meta: dict, cfg: AttentionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (B,) and the sub-codes (B, T, n) the model reads (`model_input`): real rows of a code folder or its
    own samples."""
    mc = model.cfg
    if cfg.sampled:
        labels_B = torch.arange(cfg.num_sequences) % mc.num_classes
        seeds = image_seeds(cfg.seed, labels_B, torch.arange(cfg.num_sequences) // mc.num_classes)
        sub_BLn = torch.cat(
            [
                generate(
                    model, labels_B[i : i + cfg.batch_size], SampleConfig(seed=cfg.seed), seeds[i : i + cfg.batch_size]
                )
                for i in range(0, cfg.num_sequences, cfg.batch_size)
            ]
        )
    else:
        labels_B, sub_BLn = real_sequences(model, meta, cfg.codes, cfg.num_sequences, cfg.seed, " or --sampled")
    return labels_B, model_input(model, sub_BLn, cfg)


def real_sequences(
    model: Transformer, meta: dict, codes_path: str | None, num: int, seed: int, or_else: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (B,) and whole sequences of sub-codes (B, L, n): `num` rows (drawn from `seed`, in order) of the
    code folder `codes_path`, by default the one the model was trained on (`or_else`: the caller's other way
    to sequences, for the message when there is none)."""
    mc = model.cfg
    if not (codes_path or meta["codes"].get("path")):  # an imported model: trained on no elmgen code folder
        raise ElmgenError(
            "this model has no code folder of its own: pass --codes DIR (codes of its tokenizer)" + or_else
        )
    codes = CodeDataset(codes_path or meta["codes"]["path"])
    if codes.meta["grid"] != mc.grid_size:
        raise ElmgenError(
            f"{codes.path} holds a {codes.meta['grid']}x{codes.meta['grid']} grid; the model "
            f"expects {mc.grid_size}x{mc.grid_size}"
        )
    vocab = Vocab.for_bits(mc.vocab, codes.meta["bits"])
    rows = np.random.default_rng(seed).choice(len(codes), min(num, len(codes)), replace=False)
    sub_BLn, labels_B = codes.batch(np.sort(rows), vocab)
    return labels_B, sub_BLn


def predicted_cells(model: Transformer, x_BTn: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: the cells a model predicts from its input `x_BTn` (`model_input`): AR every cell, MLM the
    masked ones. Select them from the output with `model.at_cells(out)[mask]`."""
    if model.cfg.kind == "ar":
        return torch.ones(x_BTn.shape[0], x_BTn.shape[1] + 1, dtype=torch.bool, device=x_BTn.device)
    return x_BTn[..., 0] == model.mask_index


def model_input(model: Transformer, sub_BLn: torch.Tensor, cfg: AttentionConfig) -> torch.Tensor:
    """What the model reads of whole sequences (B, L, n): AR all cells but the last (as in training), MLM all
    cells with a share `cfg.mask_ratio` masked (drawn from `cfg.seed`)."""
    if model.cfg.kind == "ar":
        return sub_BLn[:, :-1]
    gen = torch.Generator().manual_seed(cfg.seed)
    masked_BL = torch.rand(sub_BLn.shape[:2], generator=gen) < cfg.mask_ratio
    return sub_BLn.masked_fill(masked_BL[..., None], model.mask_index)


@torch.no_grad()
def mean_attention(
    model: Transformer, labels_B: torch.Tensor, sub_BTn: torch.Tensor, batch_size: int
) -> list[torch.Tensor]:
    """Per layer, the attention probabilities (A, T, S) averaged over the sequences."""
    model.eval()
    sums: list[torch.Tensor] = []
    with capture_attention(model) as maps:
        for i in range(0, len(labels_B), batch_size):
            model(labels_B[i : i + batch_size], sub_BTn[i : i + batch_size])
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

    def figures(attn_ATS):
        return attention_metrics(attn_ATS, mc.grid_size, cfg.radii, cfg.global_radius, cfg.sink_positions)

    layers = []
    for i, attn_ATS in enumerate(maps):
        layer = {k: v[0] for k, v in figures(attn_ATS.mean(0, keepdim=True)).items()}
        layers.append({"layer": i + 1, **layer, "heads": figures(attn_ATS)})
    report = {
        "kind": mc.kind,
        "n_layer": mc.n_layer,
        "d_model": mc.d_model,
        "n_head": mc.n_head,
        "params": count_params(mc),
        "vocab": mc.vocab,
        "grid": mc.grid_size,
        "step": meta.get("step"),
        "sequences": len(labels_B),
        "source": "sampled" if cfg.sampled else "real",
        "layers": layers,
        "uniform": {k: v[0] for k, v in figures(uniform_attention(T, mc.kind == "ar")).items()},
    }
    return report, maps


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
        plot_heatmaps(
            maps, grid, queries, model.cfg.kind == "ar", out / f"attention-{name.replace('/', '-')}.png", name
        )
        reports[name] = {"path": str(path), **report}
    result = {"config": asdict(cfg), "models": reports}
    atomic_write_text(out / "attention.json", json.dumps(result, indent=2))
    plot_depth(reports, out / "attention-depth.png", cfg)
    return result


def sequence_heatmaps(
    model: Transformer, label: int, sub_1Ln: torch.Tensor, cell: tuple[int, int], path, title: str
) -> None:
    """The heat-maps of `elmgen analyze attention` for one sequence (its default input rules) and one query
    cell (row, col): one per layer."""
    grid, (row, col) = model.cfg.grid_size, cell
    if not (0 <= row < grid and 0 <= col < grid):
        raise ElmgenError(f"cell ({row}, {col}) is not a (row, col) cell of the {grid}x{grid} grid")
    if model.cfg.kind == "ar" and (row, col) == (grid - 1, grid - 1):
        raise ElmgenError(f"an AR model never reads its last cell ({row}, {col}), it only predicts it: pick another")
    labels_1 = torch.tensor([label], device=sub_1Ln.device)
    maps = mean_attention(model, labels_1, model_input(model, sub_1Ln, AttentionConfig()), 1)
    plot_heatmaps([m.cpu() for m in maps], grid, [[row, col]], model.cfg.kind == "ar", path, title)


def plot_heatmaps(
    maps: list[torch.Tensor], grid: int, queries: list[list[int]], causal: bool, path, title: str
) -> None:
    """Rows: layers; columns: query cells (red box); colour: attention (mean over heads and sequences) on
    each cell; the class token's share is in the title. Cells a query cannot see are blank."""
    plt = pyplot()
    fig, axes = plt.subplots(
        len(maps), len(queries), figsize=(2.3 * len(queries), 2.3 * len(maps)), dpi=110, squeeze=False
    )
    for li, attn_ATS in enumerate(maps):
        attn_TS = attn_ATS.mean(0)
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
            ax.set_title(
                f"layer {li + 1}, cell ({row},{col})\nclass token {cls:.2f}, top cell {np.nanmax(heat, initial=0):.2f}",
                fontsize=8,
            )
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

    panels = [
        ("mean_distance", "mean attention distance (cells)"),
        (f"within_r{cfg.radii[0]}", f"share within radius {cfg.radii[0]}"),
        ("global_share", f"share beyond radius {cfg.global_radius:g}"),
        ("context_share", f"beyond radius {cfg.global_radius:g}, off the sinks"),
        ("sink_share", f"share on sink positions {cfg.sink_positions}"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), dpi=110)
    for ci, (name, rep) in enumerate(reports.items()):
        colour = f"C{ci}"
        layers = [lay["layer"] for lay in rep["layers"]]
        for ax, (key, label) in zip(axes, panels, strict=True):
            ax.plot(
                layers,
                [lay[key] for lay in rep["layers"]],
                "o-",
                color=colour,
                label=f"{name} ({rep['params'] / 1e6:.2f}M)",
            )
            ax.axhline(rep["uniform"][key], color=colour, ls=":", lw=1)
            ax.set_xlabel("layer")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(label, fontsize=9)
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, title="dotted: uniform attention", title_fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)

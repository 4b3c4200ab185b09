"""Sampling rules as small pure functions; KV-cached AR generation and MaskGIT decoding, both with CFG."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from elmgen.checkpoint import atomic_write
from elmgen.data import to_float, to_uint8
from elmgen.errors import ElmgenError
from elmgen.model import Transformer
from elmgen.plots import image_grid, save_png
from elmgen.tokenizer import Autoencoder
from elmgen.training import autocast
from elmgen.vocab import Vocab, cells_to_subcodes, subcodes_to_cells

CFG_SCHEDULES = ("constant", "linear", "cosine", "power")
MAX_OUTPAINT_WINDOWS = 1024  # an outpainting canvas costs one full AR decode per window: bound it


@dataclass
class SampleConfig:
    cfg_scale: float = 3.0  # 1 disables classifier-free guidance
    cfg_schedule: str = "linear"  # how the scale ramps from 1 to cfg_scale with progress p = (t+1)/T:
    #   constant: s; linear: 1 + (s-1) p; cosine: 1 + (s-1)(1 - cos(pi p))/2; power: 1 + (s-1) p^cfg_power
    cfg_power: float = 2.0
    cfg_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])  # guide only while p is inside
    temperature: float = 1.0  # 0 samples greedily (argmax)
    temperature_end: float | None = None  # if set, temperature moves linearly to this over the steps
    top_k: int = 0  # keep the k most likely entries of each sub-code vocabulary; 0 keeps all
    top_p: float = 1.0  # keep the smallest set of entries holding this much probability
    seed: int = 0
    kv_cache: bool = True  # AR: False recomputes the whole prefix at every step (for checking)
    compile: bool = False  # AR: torch.compile the one-cell decode step (static shapes: traced once)
    steps: int = 10  # MLM: decoding steps
    mask_noise: float = 4.5  # MLM: Gumbel noise scale on confidences, annealed to 0 over the steps
    precision: str = "fp32"  # "bf16": autocast the transformer and keep the KV cache in bfloat16

    def validate(self, vocab_size: int | None = None) -> None:
        """Refuse what would sample garbage (NaN, negative, out of range) before any work; the message names the
        option, its valid range and the value. `vocab_size`: entries of one sub-code vocabulary, when known."""
        inf = math.inf  # `0 <= x < inf` also refuses NaN: every comparison with NaN is false
        ci, t_end = self.cfg_interval, self.temperature_end
        checks = (
            ("cfg_scale", 0 <= self.cfg_scale < inf, "a number >= 0 (1 disables guidance)"),
            ("cfg_schedule", self.cfg_schedule in CFG_SCHEDULES, f"one of {', '.join(CFG_SCHEDULES)}"),
            ("cfg_power", 0 < self.cfg_power < inf, "a number > 0"),
            ("cfg_interval", len(ci) == 2 and 0 <= ci[0] <= ci[1] <= 1, "LO HI with 0 <= LO <= HI <= 1"),
            ("temperature", 0 <= self.temperature < inf, "a number >= 0 (0 samples greedily)"),
            ("temperature_end", t_end is None or 0 <= t_end < inf, "a number >= 0"),
            ("top_k", 0 <= self.top_k <= (vocab_size or self.top_k),
             "between 0 (all) and the sub-code vocabulary size" + (f" {vocab_size}" if vocab_size else "")),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("seed", self.seed >= 0, "an integer >= 0"),
            ("steps", self.steps >= 1, "at least 1"),
            ("mask_noise", 0 <= self.mask_noise < inf, "a number >= 0"),
            ("precision", self.precision in ("fp32", "bf16"), "fp32 or bf16"),
        )
        for name, ok, valid in checks:
            if not ok:
                raise ElmgenError(f"--{name.replace('_', '-')} (sample.{name}) must be {valid}, "
                                  f"not {getattr(self, name)}")


def cfg_scale_at(step: int, num_steps: int, scale: float, schedule: str, power: float = 2.0,
                 interval: tuple[float, float] | list[float] = (0.0, 1.0)) -> float:
    """Guidance scale at decoding step `step` (0-based) of `num_steps`; 1 outside the interval."""
    progress = (step + 1) / num_steps
    if not interval[0] <= progress <= interval[1]:
        return 1.0
    ramps = {
        "constant": lambda p: 1.0,
        "linear": lambda p: p,
        "cosine": lambda p: (1 - math.cos(math.pi * p)) / 2,
        "power": lambda p: p**power,
    }
    if schedule not in ramps:
        raise ElmgenError(f"unknown cfg schedule {schedule!r}; use one of {CFG_SCHEDULES}")
    return 1.0 + (scale - 1.0) * ramps[schedule](progress)


def temperature_at(step: int, num_steps: int, start: float, end: float | None) -> float:
    """Per-step temperature: constant, or linear from `start` at the first step to `end` at the last."""
    if end is None or num_steps == 1:
        return start
    return start + (end - start) * step / (num_steps - 1)


def _step_rules(cfg: SampleConfig, step: int, num_steps: int) -> tuple[float, float]:
    """(guidance scale, temperature) at one decoding step."""
    scale = cfg_scale_at(step, num_steps, cfg.cfg_scale, cfg.cfg_schedule, cfg.cfg_power, cfg.cfg_interval)
    return scale, temperature_at(step, num_steps, cfg.temperature, cfg.temperature_end)


def masked_fraction(progress):
    """Cosine mask schedule: share of cells masked after `progress` in [0, 1] of decoding (float or tensor).
    Training draws its mask ratios from the same curve at uniform progress."""
    return torch.cos(math.pi / 2 * torch.as_tensor(progress, dtype=torch.float64))


def cells_left_masked(step: int, num_steps: int, num_cells):
    """Cells still masked after MaskGIT step `step` (0-based) of `num_steps` out of `num_cells` masked
    at the start (an int, or a tensor of per-image counts); 0 after the last step."""
    if step + 1 >= num_steps:
        return num_cells * 0
    left = num_cells * float(masked_fraction((step + 1) / num_steps)) + 1e-9
    return left.floor().long() if isinstance(left, torch.Tensor) else math.floor(left)


def apply_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond + (cond - uncond) * scale


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the k largest logits of the last dimension; the rest become -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.topk(k, dim=-1).indices, True)
    return logits.masked_fill(~keep, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest most-likely set whose probability reaches p (nucleus); at least one entry."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def shape_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The distribution actually sampled: temperature, then top-k, then top-p."""
    if temperature == 0:
        return logits.float()
    return top_p_filter(top_k_filter(logits.float() / temperature, top_k), top_p)


def sample_logits(logits_BnV: torch.Tensor, temperature: float, top_k: int, top_p: float,
                  uniforms_Bn: torch.Tensor) -> torch.Tensor:
    """One draw per (row, sub-code) from the last dimension: (..., V) -> (...) int64.

    Draws by inverting the CDF at the given uniforms, so each image's randomness is its own
    (seeded per image) and independent of the batch it is generated in.
    """
    if temperature == 0:
        return logits_BnV.argmax(-1)
    return draw_from(shape_logits(logits_BnV, temperature, top_k, top_p), uniforms_Bn)


def draw_from(shaped_BnV: torch.Tensor, uniforms_Bn: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws from already shaped logits (see `shape_logits`)."""
    cdf = shaped_BnV.softmax(-1).cumsum(-1)
    target = (uniforms_Bn.to(cdf) * cdf[..., -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max(shaped_BnV.shape[-1] - 1)


def image_seeds(base_seed: int, labels_N: torch.Tensor, index_in_class_N: torch.Tensor) -> list[int]:
    """A distinct seed for the j-th image of class c: never repeated within a class, shard-independent."""
    return [int(np.random.SeedSequence([base_seed, int(c), int(j)]).generate_state(1, np.uint64)[0] >> 1)
            for c, j in zip(labels_N.tolist(), index_in_class_N.tolist(), strict=True)]


def uniforms_for(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """(len(seeds), *shape) uniforms in [0, 1), row i drawn from its own generator seeded with seeds[i]."""
    return torch.stack([torch.rand(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def generate(model: Transformer, labels_B: torch.Tensor, cfg: SampleConfig, seeds: list[int]) -> torch.Tensor:
    """Class-conditional generation: labels (B,) -> sub-codes (B, L, n), one seed per image."""
    model.eval()
    return (generate_mlm if model.cfg.kind == "mlm" else generate_ar)(model, labels_B, cfg, seeds)


def _with_null(model: Transformer, labels_B: torch.Tensor, guided: bool) -> torch.Tensor:
    """The guided batch: conditional rows, then the same rows with the null class."""
    return torch.cat([labels_B, torch.full_like(labels_B, model.null_class)]) if guided else labels_B


@torch.no_grad()
def generate_ar(model: Transformer, labels_B: torch.Tensor, cfg: SampleConfig, seeds: list[int],
                known_sub_BLn: torch.Tensor | None = None, known_BL: torch.Tensor | None = None) -> torch.Tensor:
    """Raster-order decoding, one cell per step, with a KV cache unless cfg.kv_cache is off.
    Cells marked in `known_BL` are fed their `known_sub_BLn` codes instead of a draw (outpainting)."""
    cfg.validate(model.vocab_size)
    B, L, n = labels_B.shape[0], model.cfg.num_cells, model.n_sub
    uniforms_BLn = uniforms_for(seeds, (L, n)).to(labels_B.device)
    guided = cfg.cfg_scale != 1.0
    labels_in = _with_null(model, labels_B, guided)
    out_BLn = torch.zeros(B, L, n, dtype=torch.long, device=labels_B.device)

    def both(x):
        return torch.cat([x, x]) if guided else x

    cache_dtype = torch.bfloat16 if cfg.precision == "bf16" else None
    caches = model.new_caches(labels_in.shape[0], cache_dtype) if cfg.kv_cache else None
    decode_step = torch.compile(model.decode_step, dynamic=False) if cfg.compile else model.decode_step
    # One autocast region for the whole loop: weights are cast to bfloat16 once, not at every step.
    with autocast(labels_B.device, cfg.precision):
        logits = model(labels_in, both(out_BLn[:, :0]), caches)[:, -1]  # class token -> first cell
        for t in range(L):
            if t > 0 and caches is not None:
                pos_1 = torch.tensor([t], device=labels_B.device)
                logits = decode_step(both(out_BLn[:, t - 1: t]), pos_1, caches)[:, -1]
            elif t > 0:
                logits = model(labels_in, both(out_BLn[:, :t]))[:, -1]
            logits = logits.float()
            scale, temperature = _step_rules(cfg, t, L)
            if guided:
                cond, uncond = logits.chunk(2)
                logits = apply_cfg(cond, uncond, scale)
            draw_Bn = sample_logits(logits, temperature, cfg.top_k, cfg.top_p, uniforms_BLn[:, t])
            if known_BL is not None:
                draw_Bn = torch.where(known_BL[:, t, None], known_sub_BLn[:, t], draw_Bn)
            out_BLn[:, t] = draw_Bn
    return out_BLn


def check_compatible(lm_meta: dict, tokenizer_meta: dict) -> None:
    """The LM must have been trained on codes of exactly this tokenizer."""
    vocab = Vocab.parse(lm_meta["model"]["vocab"])
    lm_grid = lm_meta["model"]["grid_size"]
    tok_bits = tokenizer_meta["bits"]
    tok_grid = tokenizer_meta["grid"]
    if vocab.bits != tok_bits or lm_grid != tok_grid:
        raise ElmgenError(
            f"the LM predicts {vocab.bits}-bit codes (vocabulary {vocab}) on a {lm_grid}x{lm_grid} grid but the "
            f"tokenizer {tokenizer_meta['path']} makes {tok_bits}-bit codes on {tok_grid}x{tok_grid}; "
            f"pass the tokenizer the LM was trained with ({lm_meta['codes']['tokenizer']})"
        )
    if lm_meta["codes"]["tokenizer_fingerprint"] != tokenizer_meta["fingerprint"]:
        raise ElmgenError(
            f"the LM was trained on codes of tokenizer {lm_meta['codes']['tokenizer']} (weights "
            f"{lm_meta['codes']['tokenizer_fingerprint']}), not {tokenizer_meta['path']} "
            f"(weights {tokenizer_meta['fingerprint']}); pass the tokenizer the LM was trained with"
        )


@torch.no_grad()
def generate_mlm(model: Transformer, labels_B: torch.Tensor, cfg: SampleConfig, seeds: list[int],
                 known_sub_BLn: torch.Tensor | None = None, known_BL: torch.Tensor | None = None) -> torch.Tensor:
    """MaskGIT: start with every unknown cell masked; each step samples every masked cell, keeps the most
    confident (log p averaged over sub-codes + annealed Gumbel noise) and re-masks the rest on a cosine
    schedule. Cells marked in `known_BL` keep their `known_sub_BLn` codes throughout (inpainting)."""
    cfg.validate(model.vocab_size)
    B, L, n, S = labels_B.shape[0], model.cfg.num_cells, model.n_sub, cfg.steps
    device = labels_B.device
    noise_BSLm = uniforms_for(seeds, (S, L, n + 1)).to(device)  # n token draws + 1 Gumbel per cell
    guided = cfg.cfg_scale != 1.0
    labels_in = _with_null(model, labels_B, guided)
    masked_BL = torch.ones(B, L, dtype=torch.bool, device=device) if known_BL is None else ~known_BL.to(device)
    sub_BLn = torch.full((B, L, n), model.mask_index, dtype=torch.long, device=device)
    if known_sub_BLn is not None:
        sub_BLn = torch.where(masked_BL[..., None], sub_BLn, known_sub_BLn.to(device))
    unknown_B = masked_BL.sum(-1)
    for t in range(S):
        x = torch.cat([sub_BLn, sub_BLn]) if guided else sub_BLn
        with autocast(device, cfg.precision):
            logits = model(labels_in, x)[:, 1:].float()
        scale, temperature = _step_rules(cfg, t, S)
        if guided:
            cond, uncond = logits.chunk(2)
            logits = apply_cfg(cond, uncond, scale)
        shaped = shape_logits(logits, temperature, cfg.top_k, cfg.top_p)  # once: drawn from and scored
        draw_BLn = shaped.argmax(-1) if temperature == 0 else draw_from(shaped, noise_BSLm[:, t, :, :n])
        logp = shaped.log_softmax(-1)
        confidence_BL = logp.gather(-1, draw_BLn[..., None]).squeeze(-1).mean(-1)
        u = noise_BSLm[:, t, :, n].clamp(1e-20, 1 - 1e-7)
        confidence_BL = confidence_BL + cfg.mask_noise * (1 - (t + 1) / S) * -torch.log(-torch.log(u))
        confidence_BL = confidence_BL.masked_fill(~masked_BL, float("inf"))  # known cells are never re-masked
        # The least confident `keep` cells stay masked; every step reveals at least one cell.
        keep_B = torch.minimum(cells_left_masked(t, S, unknown_B), masked_BL.sum(-1) - 1).clamp_min(0)
        still_BL = confidence_BL.argsort(-1).argsort(-1) < keep_B[:, None]
        sub_BLn = torch.where((masked_BL & ~still_BL)[..., None], draw_BLn, sub_BLn)
        masked_BL = still_BL
    return sub_BLn


def class_balanced(classes: list[int], num_per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (N,) and each image's index within its class, class by class."""
    labels = torch.tensor(classes).repeat_interleave(num_per_class)
    return labels, torch.arange(num_per_class).repeat(len(classes))


@torch.no_grad()
def sample_images(model: Transformer, tokenizer: Autoencoder, labels: torch.Tensor, seeds: list[int],
                  cfg: SampleConfig, batch_size: int = 100, progress: bool = True) -> torch.Tensor:
    """Class labels (N,) and per-image seeds -> uint8 images (N, C, H, W)."""
    device = next(model.parameters()).device
    vocab, g = model.cfg.vocabulary, model.cfg.grid_size
    out = []
    for start in tqdm(range(0, len(labels), batch_size), desc="sample", unit="batch", disable=not progress):
        batch = slice(start, start + batch_size)
        sub_BLn = generate(model, labels[batch].to(device), cfg, seeds[batch])
        cells_BL = subcodes_to_cells(sub_BLn, vocab).to(next(tokenizer.parameters()).device)
        out.append(to_uint8(tokenizer.decode_cells(cells_BL, g)).cpu())
    return torch.cat(out)


@torch.no_grad()
def inpaint_images(model: Transformer, tokenizer: Autoencoder, images_BCHW: torch.Tensor,
                   labels_B: torch.Tensor, region: tuple[int, int, int, int], cfg: SampleConfig,
                   seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Regenerate a rectangle of grid cells (top, left, height, width) of real uint8 images with the MLM.

    Returns the inpainted images and the inputs with the region blanked (for showing), both uint8.
    """
    if model.cfg.kind != "mlm":
        raise ElmgenError("inpainting needs a masked model (trained with --kind mlm)")
    g = model.cfg.grid_size
    top, left, height, width = region
    if not (0 <= top and 0 <= left and height > 0 and width > 0 and top + height <= g and left + width <= g):
        raise ElmgenError(f"region {region} (top left height width, in cells) must fit the {g}x{g} grid")
    device = next(model.parameters()).device
    cells_BL = tokenizer.encode_cells(to_float(images_BCHW).to(next(tokenizer.parameters()).device))
    sub_BLn = cells_to_subcodes(cells_BL, model.cfg.vocabulary).to(device)
    hole_hw = torch.zeros(g, g, dtype=torch.bool)
    hole_hw[top:top + height, left:left + width] = True
    known_BL = (~hole_hw.flatten()).expand(len(labels_B), -1)
    out_BLn = generate_mlm(model, labels_B.to(device), cfg, seeds, sub_BLn, known_BL)
    result = to_uint8(tokenizer.decode_cells(subcodes_to_cells(out_BLn, model.cfg.vocabulary), g)).cpu()
    f = images_BCHW.shape[-1] // g
    blanked = images_BCHW.clone()
    blanked[..., top * f:(top + height) * f, left * f:(left + width) * f] = 128
    return result, blanked


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Offsets of windows of `window` cells that cover `size` cells, `stride` apart; the last one ends
    exactly at the edge."""
    starts = list(range(0, size - window, stride))
    return starts + [size - window]


@torch.no_grad()
def outpaint_ar(model: Transformer, labels_B: torch.Tensor, cfg: SampleConfig, seeds: list[int],
                height: int, width: int, stride: int) -> torch.Tensor:
    """Class-conditional images on a grid larger than the trained one: sub-codes (B, height*width, n).

    A trained-size window slides over the canvas in raster order, `stride` cells at a time; in each
    window the AR model is fed the cells generated so far (as in teacher forcing) and samples the rest,
    so every new cell sees the cells above and to its left within one window. The first window is
    exactly `generate_ar` with the same seeds.
    """
    g, n = model.cfg.grid_size, model.n_sub
    if height < g or width < g or not 1 <= stride <= g:
        raise ElmgenError(f"outpainting needs a grid of at least {g}x{g} cells (got {height}x{width}) and "
                          f"a stride between 1 and {g} (got {stride})")
    rows, cols = window_starts(height, g, stride), window_starts(width, g, stride)
    if len(rows) * len(cols) > MAX_OUTPAINT_WINDOWS:
        raise ElmgenError(f"outpainting {height}x{width} cells at stride {stride} takes {len(rows) * len(cols):,} "
                          f"windows of {g}x{g} cells (each a full AR decode), more than {MAX_OUTPAINT_WINDOWS:,}; "
                          "use a smaller --width/--height or a larger --stride")
    model.eval()
    B, device = labels_B.shape[0], labels_B.device
    canvas_BHWn = torch.zeros(B, height, width, n, dtype=torch.long, device=device)
    known_BHW = torch.zeros(B, height, width, dtype=torch.bool, device=device)
    windows = [(r, c) for r in rows for c in cols]
    for i, (r, c) in enumerate(tqdm(windows, desc="outpaint", unit="window", leave=False)):
        known = known_BHW[:, r:r + g, c:c + g].reshape(B, g * g)
        if bool(known.all()):
            continue
        window_seeds = seeds if i == 0 else [int(np.random.SeedSequence([s, i]).generate_state(1)[0]) for s in seeds]
        sub_BLn = canvas_BHWn[:, r:r + g, c:c + g].reshape(B, g * g, n)
        out_BLn = generate_ar(model, labels_B, cfg, window_seeds, sub_BLn, known)
        canvas_BHWn[:, r:r + g, c:c + g] = out_BLn.view(B, g, g, n)
        known_BHW[:, r:r + g, c:c + g] = True
    return canvas_BHWn.view(B, height * width, n)


@torch.no_grad()
def outpaint_images(model: Transformer, tokenizer: Autoencoder, labels: torch.Tensor, seeds: list[int],
                    cfg: SampleConfig, height: int, width: int, stride: int) -> torch.Tensor:
    """Class labels (N,) -> uint8 images (N, C, height*f, width*f) from an AR model (see `outpaint_ar`)."""
    if model.cfg.kind != "ar":
        raise ElmgenError("outpainting needs an autoregressive model (trained with --kind ar)")
    device = next(model.parameters()).device
    sub_BLn = outpaint_ar(model, labels.to(device), cfg, seeds, height, width, stride)
    cells_BL = subcodes_to_cells(sub_BLn, model.cfg.vocabulary).to(next(tokenizer.parameters()).device)
    return to_uint8(tokenizer.decode_cells(cells_BL, height, width)).cpu()


def write_samples(images_NCHW: torch.Tensor, labels_N: torch.Tensor, seeds: list[int], out_dir, ncols: int,
                  name: str = "samples") -> tuple[Path, Path]:
    """`name`.png (a grid, `ncols` images a row) and an ADM-style `name`.npz (arr_0 NHWC uint8, arr_1 labels,
    plus each image's seed)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png, npz = out_dir / f"{name}.png", out_dir / f"{name}.npz"
    save_png(image_grid(images_NCHW, ncols=ncols, scale=2), png)
    atomic_write(npz, lambda f: np.savez(f, images_NCHW.permute(0, 2, 3, 1).numpy(), labels_N.numpy(),
                                         seeds=np.asarray(seeds, np.uint64)))
    return png, npz

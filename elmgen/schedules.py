"""Schedules as small pure functions of the step, shared by training and sampling: the learning rate, the
guidance scale, the temperature and the MaskGIT mask share (training draws its mask ratios from the same
curve that decoding follows)."""

from __future__ import annotations

import math

import torch

from elmgen.errors import ElmgenError


def lr_at(step: int, cfg, total_steps: int | None = None) -> float:
    """Learning rate at `step` of a TrainConfig's run of `total_steps` (default cfg.steps): linear warm-up, then
    constant or cosine decay to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_decay == "cosine":
        total = cfg.steps if total_steps is None else total_steps
        progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr


GUIDANCE_SCHEDULES = ("constant", "linear", "cosine", "power")


def guidance_scale_at(
    step: int,
    num_steps: int,
    scale: float,
    schedule: str,
    power: float = 2.0,
    interval: tuple[float, float] | list[float] = (0.0, 1.0),
) -> float:
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
        raise ElmgenError(f"unknown guidance schedule {schedule!r}; use one of {GUIDANCE_SCHEDULES}")
    return 1.0 + (scale - 1.0) * ramps[schedule](progress)


def temperature_at(step: int, num_steps: int, start: float, end: float | None) -> float:
    """Per-step temperature: constant, or linear from `start` at the first step to `end` at the last."""
    if end is None or num_steps == 1:
        return start
    return start + (end - start) * step / (num_steps - 1)


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

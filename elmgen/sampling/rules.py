"""Sampling rules as small pure functions of logits: guidance, temperature, top-k, top-p, and inverse-CDF
draws at given uniforms (so each image's randomness is its own)."""

from __future__ import annotations

import torch


def guided_labels(model, labels_B: torch.Tensor, scale: float) -> tuple[bool, torch.Tensor]:
    """Whether guidance is on (scale 1 turns it off) and the labels the model reads: the conditional rows, then
    (guided) the same rows with the null class."""
    guided = scale != 1.0
    return guided, torch.cat([labels_B, torch.full_like(labels_B, model.null_class)]) if guided else labels_B


def apply_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond + (cond - uncond) * scale


def guide(logits: torch.Tensor, guided: bool, scale: float) -> torch.Tensor:
    """Classifier-free guidance over a batch of conditional rows followed by the same rows unconditioned (the
    batch `guided_labels` makes); unguided logits pass as they are."""
    if not guided:
        return logits
    cond, uncond = logits.chunk(2)
    return apply_guidance(cond, uncond, scale)


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


def sample_logits(
    logits_BnV: torch.Tensor, temperature: float, top_k: int, top_p: float, uniforms_Bn: torch.Tensor
) -> torch.Tensor:
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

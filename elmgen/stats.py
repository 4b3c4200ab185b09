"""Statistics over replicated runs: a mean with its 95% t-interval, and a paired bootstrap of a difference.

Replicate r of every sweep row uses the same seeds, so two rows are compared pair by pair (row A's
replicate r against row B's): the seed's own luck cancels and only the rows' difference remains.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as scipy_stats


def mean_interval(values, level: float = 0.95) -> tuple[float, float]:
    """The mean of `values` and the half-width of its `level` t-interval (nan for a single value)."""
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan
    half = scipy_stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return mean, float(half)


def paired_bootstrap(a, b, draws: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """The mean paired difference b - a, its percentile bootstrap interval (pairs resampled together),
    and whether that interval excludes 0 (significant at 1 - level)."""
    diff = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    if diff.ndim != 1 or len(diff) < 2:
        raise ValueError(f"a paired bootstrap needs two equal-length series of >= 2 values, got {diff.shape}")
    rng = np.random.default_rng(seed)
    means_R = diff[rng.integers(0, len(diff), size=(draws, len(diff)))].mean(axis=1)
    low, high = np.quantile(means_R, [(1 - level) / 2, (1 + level) / 2])
    significant = bool(low > 0 or high < 0)
    return {"diff": float(diff.mean()), "low": float(low), "high": float(high), "significant": significant}

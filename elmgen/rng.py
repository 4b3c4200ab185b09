"""Per-item random streams: every image (or view of one) draws from its own generator, seeded from its
identity, so what it gets never depends on the batch, shard or process it is handled in."""

from __future__ import annotations

import numpy as np
import torch


def item_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (e.g. base seed, class, index within the class)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> 1)


def uniforms_for(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """(len(seeds), *shape) uniforms in [0, 1), row i drawn from its own generator seeded with seeds[i]."""
    return torch.stack([torch.rand(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])

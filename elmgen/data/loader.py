"""The input pipeline: the loop's micro-batches decoded (and augmented) by DataLoader worker processes ahead of
the step that trains on them.

Which images a micro-batch holds is the loop's pure function of (seed, step) (`local_micro_batches`): a sampler
yields those indices, from the step a run starts (or resumes) at, in the order the loop consumes them. Every
random augmentation draws from generators seeded by (seed, step, image), so a batch is the same with any number
of workers and a resumed run sees what an uninterrupted one did.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from elmgen.errors import ElmgenError
from elmgen.rng import item_seed, uniforms_for

# load(step, idx): the micro-batch of dataset indices `idx` at `step`, a pure function of its arguments
Load = Callable[[int, np.ndarray], object]

MAX_WORKERS = 8  # past this, decoding small images outpaces any step that trains on them


def default_workers(in_memory: bool) -> int:
    """Worker processes when train.workers is not set. None for a data set held in memory (Fashion-MNIST):
    indexing a tensor costs less than sending the batch from another process. Else one per core this process
    may use (its share under torchrun) but the one the training step runs on, at most MAX_WORKERS."""
    if in_memory:
        return 0
    cores = len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, min(MAX_WORKERS, cores - 1))


def item_uniforms(seed: int, step: int, idx: np.ndarray, draws: int) -> torch.Tensor:
    """(len(idx), draws) uniforms for augmenting the images `idx` at `step`: each image's from its own generator."""
    return uniforms_for([item_seed(seed, step, int(i)) for i in idx], (draws,))


def decoded(dataset, step: int, idx: np.ndarray) -> torch.Tensor:
    """A Load that only decodes: the uint8 images `idx` of an ImageDataset (bind it with functools.partial)."""
    return dataset.images(idx)


@dataclass
class Failed:
    """A worker's ElmgenError, carried back as data: the main process raises it as the one line it is (a
    DataLoader would re-raise it wrapped in the worker's traceback)."""

    message: str


class MicroBatches(Dataset):
    """A map-style data set whose items are whole micro-batches: (step, indices) -> load(step, indices)."""

    def __init__(self, load: Load):
        self.load = load

    def __getitem__(self, key: tuple[int, np.ndarray]):
        try:
            return self.load(*key)
        except ElmgenError as e:
            return Failed(str(e))


def micro_batches(
    load: Load, workers: int, seed: int, indices: Iterable[tuple[int, np.ndarray]], device: torch.device
) -> Iterator:
    """load(step, idx) of each (step, idx) in `indices`, in order, by `workers` processes (0: in this one)
    with two micro-batches each in flight, in pinned memory when they go to a GPU."""
    loader = DataLoader(
        MicroBatches(load),
        sampler=indices,
        batch_size=None,  # each item is a micro-batch already
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),  # its base seed must not draw from the global RNG
    )
    for item in loader:
        if isinstance(item, Failed):
            raise ElmgenError(item.message)
        yield item

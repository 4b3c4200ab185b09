"""Image data sets: Fashion-MNIST from Debian's IDX files, and class-per-folder image trees.

Every data set yields uint8 images of shape (C, S, S) and integer labels (`elmgen.data.transforms`
maps them to [-1, 1] for the networks and back). A small image folder has every file decoded when it is
loaded; larger folders: `elmgen check-data`.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from elmgen.data.images import (
    IMAGE_SUFFIXES,
    class_files,
    find_bad_images,
    image_array,
    interleave_classes,
)
from elmgen.errors import ElmgenError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


# An image folder of at most this many files is decoded in full when loaded, so a corrupt
# file stops the run at once rather than hours into training; larger folders: `elmgen check-data`.
CHECK_AT_LOAD_MAX_FILES = 5000


IDX_TYPES = {0x09: "signed byte", 0x0B: "16-bit integer", 0x0C: "32-bit integer", 0x0D: "float", 0x0E: "double"}


@dataclass
class DataConfig:
    source: str = "fashion-mnist"  # "fashion-mnist" or a folder with one sub-folder per class
    split: str = "train"  # "train" or "test"; a folder uses <source>/<split> when it exists
    image_size: int = 32  # side of the square images fed to the tokenizer
    channels: int = 1  # 1 (grey) or 3 (RGB)
    limit: int | None = None  # use only the first N images (quick runs, tests)
    holdout: float = 0.1  # a folder without <source>/test: share of each class held out as its test split


def absolute_source(cfg: DataConfig) -> DataConfig:
    """`cfg` with a folder source as an absolute path: what a run records must resolve from any working folder."""
    return cfg if cfg.source == "fashion-mnist" else replace(cfg, source=str(Path(cfg.source).resolve()))


HOLDOUT_SEED = 0  # the held-out images are a fixed function of the folder's listing and the share


class ImageDataset:
    """Images as uint8 (C, S, S) tensors with labels; `images(idx)` loads a batch."""

    labels: np.ndarray
    class_names: list[str]
    name: str
    in_memory: bool  # every image held decoded (a batch is an index), or decoded from its file when asked for

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def images(self, idx) -> torch.Tensor:
        raise NotImplementedError


class FashionMNIST(ImageDataset):
    in_memory = True

    def __init__(self, split: str, image_size: int, channels: int, root: str | None = None):
        root = Path(root or os.environ.get("ELMGEN_FASHION_MNIST", FASHION_MNIST_DIR))
        prefix = {"train": "train", "test": "t10k"}.get(split)
        if prefix is None:
            raise ElmgenError(f"unknown split {split!r} for Fashion-MNIST; use 'train' or 'test'")
        image_file = root / f"{prefix}-images-idx3-ubyte.gz"
        label_file = root / f"{prefix}-labels-idx1-ubyte.gz"
        for f in (image_file, label_file):
            if not f.is_file():
                raise ElmgenError(
                    f"Fashion-MNIST file missing: {f}; install it with "
                    "'apt-get install -y dataset-fashion-mnist' or set ELMGEN_FASHION_MNIST"
                )
        raw = read_idx(image_file)  # (N, 28, 28)
        if raw.ndim != 3:
            raise ElmgenError(f"{image_file} holds arrays of shape {raw.shape}, not images")
        self.labels = read_idx(label_file).astype(np.int64)
        pad = max(0, (32 - raw.shape[1]) // 2)
        arr = np.pad(raw, ((0, 0), (pad, pad), (pad, pad)))  # 28x28 -> 32x32, as the paper's f=4/8 grids need
        self._images = torch.from_numpy(arr).unsqueeze(1)  # kept at 32x32; resized per batch (memory)
        self.image_size, self.channels = image_size, channels
        self.class_names = list(FASHION_MNIST_CLASSES)
        self.name = f"fashion-mnist/{split}"

    def images(self, idx) -> torch.Tensor:
        x = self._images[torch.as_tensor(idx)]
        if self.image_size != x.shape[-1]:
            x = (
                torch.nn.functional.interpolate(
                    x.float(), size=(self.image_size, self.image_size), mode="bilinear", antialias=True
                )
                .round()
                .clamp(0, 255)
                .to(torch.uint8)
            )
        return x.expand(-1, self.channels, -1, -1).contiguous()


class ImageFolder(ImageDataset):
    """`root/<class>/<image>`; images are centre-cropped to a square and resized."""

    in_memory = False

    def __init__(self, root: str | Path, split: str, image_size: int, channels: int, holdout: float = 0.0):
        root = Path(root)
        held_out, note = None, " (no held-out split)"  # the name says what the images are
        if (root / split).is_dir():
            root, note = root / split, ""
        elif split not in ("train", "test"):
            raise ElmgenError(f"unknown split {split!r}: {root} has no {split}/ folder; use 'train' or 'test'")
        elif holdout > 0:  # no folder for this split: a fixed share of each class is the test split
            root = root / "train" if (root / "train").is_dir() else root
            held_out = split == "test"
            note = f" ({'held-out' if held_out else 'training'} part: {holdout:.0%} of each class held out)"
        classes, files, labels, empty = class_files(root)
        if empty:
            more = f" (nor do {len(empty) - 1} more)" if len(empty) > 1 else ""
            raise ElmgenError(
                f"class folder {empty[0]} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}){more}; "
                "add images or remove it"
            )
        if len(files) <= CHECK_AT_LOAD_MAX_FILES:
            bad = find_bad_images(files)
            if bad:
                first = ", ".join(f"{path} ({reason})" for path, reason in bad[:3])
                raise ElmgenError(
                    f"{len(bad)} corrupt or unreadable image(s) in {root}: {first}; remove or replace "
                    f"them (run `elmgen check-data {root}` for the full list)"
                )
        labels = np.asarray(labels, dtype=np.int64)
        self.name = str(root) + note
        if held_out is not None:
            keep = holdout_mask(labels, holdout) == held_out
            files, labels = [f for f, k in zip(files, keep, strict=True) if k], labels[keep]
        order = interleave_classes(labels)  # so that the first N images of a split cover every class
        self.files = [files[i] for i in order]
        self.labels = labels[order]
        self.class_names = classes
        self.image_size = image_size
        self.channels = channels

    def load(self, i: int) -> np.ndarray:
        return image_array(self.files[i], self.channels, self.image_size)

    def images(self, idx) -> torch.Tensor:
        idx = np.atleast_1d(np.asarray(idx))
        return torch.from_numpy(np.stack([self.load(int(i)) for i in idx]))


def holdout_mask(labels_N: np.ndarray, share: float) -> np.ndarray:
    """Which images are held out: round(share x n) of each class of n images (at least one, never all),
    picked by a permutation seeded per class, so the split is the same on every run and machine."""
    held_N = np.zeros(len(labels_N), dtype=bool)
    for c in np.unique(labels_N):
        idx = np.flatnonzero(labels_N == c)
        k = min(len(idx) - 1, max(1, round(share * len(idx))))
        held_N[np.random.default_rng([HOLDOUT_SEED, int(c)]).permutation(idx)[:k]] = True
    return held_N


class Subset(ImageDataset):
    def __init__(self, base: ImageDataset, indices):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = base.labels[self.indices]
        self.class_names = base.class_names
        self.name = f"{base.name}[:{len(self.indices)}]"
        self.in_memory = base.in_memory

    def images(self, idx) -> torch.Tensor:
        return self.base.images(self.indices[np.asarray(idx)])


def load_dataset(cfg: DataConfig) -> ImageDataset:
    if cfg.channels not in (1, 3):
        raise ElmgenError(f"data.channels must be 1 or 3, not {cfg.channels}")
    if not 0 <= cfg.holdout < 1:
        raise ElmgenError(f"data.holdout must be in [0, 1), not {cfg.holdout}")
    if cfg.limit is not None and cfg.limit < 1:
        raise ElmgenError(f"--limit (data.limit) must be positive, not {cfg.limit}; omit it to use every image")
    if cfg.source == "fashion-mnist":
        ds = FashionMNIST(cfg.split, cfg.image_size, cfg.channels)
    else:
        ds = ImageFolder(cfg.source, cfg.split, cfg.image_size, cfg.channels, cfg.holdout)
    if cfg.limit is not None:
        ds = Subset(ds, range(min(cfg.limit, len(ds))))
    return ds


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) of unsigned bytes."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ElmgenError(f"cannot read IDX file {path}: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ElmgenError(f"{path} is not an IDX file; pass Fashion-MNIST's IDX files (unsigned bytes)")
    if data[2] != 0x08:  # labels of another type would be truncated or misread: refuse them
        kind = IDX_TYPES.get(data[2], f"type 0x{data[2]:02x}")
        raise ElmgenError(
            f"{path} holds {kind} values, not unsigned bytes; pass images and integer labels 0-255 "
            "as unsigned-byte IDX files"
        )
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ElmgenError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {body.size}")
    return body.reshape(shape)


def pick_images(cfg: DataConfig, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images `indices` of a data set (uint8, N C H W) and their labels; an index outside it is one line."""
    data = load_dataset(cfg)
    bad = [i for i in indices if not 0 <= i < len(data)]
    if bad:
        raise ElmgenError(f"image indices {bad} are out of range: the {cfg.split} split has {len(data)} images")
    return data.images(indices), torch.as_tensor(data.labels[indices])

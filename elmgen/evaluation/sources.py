"""Images to measure, read batch by batch in the feature extractor's format: sample files (ADM-style .npz),
folders of images, and data sets."""

from __future__ import annotations

import contextlib
import zipfile
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from elmgen.data import IMAGE_SUFFIXES, DataConfig, center_crop_resize, load_dataset, load_pixels
from elmgen.data.loader import decoded, default_workers, micro_batches
from elmgen.errors import ElmgenError
from elmgen.sampling import SHARD_FILE


def conform(images_NHWC: np.ndarray, size: int, channels: int, what: str) -> np.ndarray:
    """uint8 (N, H, W[, C]) -> (N, channels, size, size): ADM centre crop/resize where the size differs, grey -> RGB
    by repetition; RGB -> grey only when the three channels are equal (anything else would be a silent change)."""
    if images_NHWC.dtype != np.uint8:
        raise ElmgenError(f"{what} are {images_NHWC.dtype}, not uint8 images")
    if images_NHWC.ndim == 3:
        images_NHWC = images_NHWC[..., None]
    C = images_NHWC.shape[-1]
    if images_NHWC.ndim != 4 or C not in (1, 3):
        raise ElmgenError(f"{what} have shape {images_NHWC.shape}; expected (N, H, W, C) with C = 1 or 3")
    if C == 3 and channels == 1:
        if not (images_NHWC == images_NHWC[..., :1]).all():
            raise ElmgenError(f"{what} are colour images but the feature extractor takes grey ones")
        images_NHWC = images_NHWC[..., :1]
    elif C == 1 and channels == 3:
        images_NHWC = np.repeat(images_NHWC, 3, axis=-1)
    if images_NHWC.shape[1:3] != (size, size):
        images_NHWC = np.stack(
            [
                np.asarray(center_crop_resize(Image.fromarray(img[..., 0] if channels == 1 else img), size)).reshape(
                    size, size, channels
                )
                for img in images_NHWC
            ]
        )
    return np.ascontiguousarray(images_NHWC.transpose(0, 3, 1, 2))


class ImageSource:
    """Images to measure, read batch by batch: `batches` yields uint8 (B, C, S, S) in the extractor's format."""

    name: str
    labels: np.ndarray | None

    def __len__(self) -> int:
        raise NotImplementedError

    def batches(self, batch_size: int, size: int, channels: int) -> Iterator[np.ndarray]:
        raise NotImplementedError


def _npy_header(f, what: str) -> tuple[tuple, bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise ElmgenError(f"{what}: unsupported .npy format version {version}")
    return readers[version](f)


class NpzImages(ImageSource):
    """ADM-style sample files (`arr_0` uint8 (N, H, W, C), optional `arr_1` labels), one or several shards read in
    order. `arr_0` is streamed from the zip, so 50k ImageNet samples never sit in memory at once."""

    def __init__(self, paths):
        self.paths = [Path(p) for p in paths]
        self.counts, labels = [], []
        for path in self.paths:
            try:
                with zipfile.ZipFile(path) as zf:
                    if "arr_0.npy" not in zf.namelist():
                        raise ElmgenError(
                            f"{path} holds no arr_0 (expected ADM layout: arr_0 uint8 NHWC images, arr_1 labels)"
                        )
                    with zf.open("arr_0.npy") as f:
                        shape, fortran, dtype = _npy_header(f, str(path))
                with np.load(path, allow_pickle=False) as z:
                    labels.append(z["arr_1"].reshape(-1) if "arr_1" in z else None)
            except (zipfile.BadZipFile, OSError, ValueError) as e:
                raise ElmgenError(f"cannot read {path} as an .npz file: {e}") from None
            if dtype != np.uint8 or fortran or len(shape) not in (3, 4) or shape[0] == 0:
                raise ElmgenError(
                    f"{path}: arr_0 is {dtype} of shape {shape}; expected uint8 images (N, H, W, C) with N >= 1"
                )
            self.counts.append(shape[0])
            if labels[-1] is not None and (labels[-1].dtype.kind not in "iu" or len(labels[-1]) != shape[0]):
                raise ElmgenError(
                    f"{path}: arr_1 holds {len(labels[-1])} {labels[-1].dtype} labels for {shape[0]} "
                    "images; expected one integer class id per image"
                )
        if any(lab is None for lab in labels) and not all(lab is None for lab in labels):
            raise ElmgenError("some sample shards have labels (arr_1) and some do not; pass shards of one run")
        self.labels = None if labels[0] is None else np.concatenate(labels).astype(np.int64)
        self.name = ", ".join(str(p) for p in self.paths)

    def __len__(self) -> int:
        return sum(self.counts)

    def batches(self, batch_size: int, size: int, channels: int) -> Iterator[np.ndarray]:
        for path in self.paths:
            with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
                shape, _, _ = _npy_header(f, str(path))
                per_image = int(np.prod(shape[1:]))
                for start in range(0, shape[0], batch_size):
                    n = min(batch_size, shape[0] - start)
                    chunk = np.frombuffer(bytearray(f.read(n * per_image)), dtype=np.uint8).reshape(n, *shape[1:])
                    yield conform(chunk, size, channels, str(path))


class FolderImages(ImageSource):
    """Image files under a folder (any depth); labelled when every image sits in a sub-folder named by its class id."""

    def __init__(self, root):
        root = Path(root)
        self.files = sorted(f for f in root.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise ElmgenError(f"no images (.png, .jpg, ...) found under {root}")
        parents = [f.parent.relative_to(root).parts for f in self.files]
        labelled = all(len(p) == 1 and p[0].isdigit() for p in parents)
        self.labels = np.asarray([int(p[0]) for p in parents]) if labelled else None
        self.name = str(root)

    def __len__(self) -> int:
        return len(self.files)

    def batches(self, batch_size: int, size: int, channels: int) -> Iterator[np.ndarray]:
        for start in range(0, len(self.files), batch_size):
            yield np.concatenate(
                [conform(load_pixels(f)[None], size, channels, str(f)) for f in self.files[start : start + batch_size]]
            )


class DatasetImages(ImageSource):
    """A data set (Fashion-MNIST, a class folder) loaded at the extractor's resolution and channels, decoded by
    `workers` processes (None: `default_workers`)."""

    def __init__(self, cfg: DataConfig, size: int, channels: int, workers: int | None = None):
        self.dataset = load_dataset(replace(cfg, image_size=size, channels=channels))
        self.labels, self.name = self.dataset.labels, self.dataset.name
        self.workers = default_workers(self.dataset.in_memory) if workers is None else workers

    def __len__(self) -> int:
        return len(self.dataset)

    def batches(self, batch_size: int, size: int, channels: int) -> Iterator[np.ndarray]:
        n = len(self.dataset)
        pairs = ((s, np.arange(s, min(n, s + batch_size))) for s in range(0, n, batch_size))
        images = micro_batches(partial(decoded, self.dataset), self.workers, 0, pairs, torch.device("cpu"))
        with contextlib.closing(images):  # closing the generator stops the workers
            for batch in images:
                yield conform(batch.numpy().transpose(0, 2, 3, 1), size, channels, self.name)


def open_samples(paths) -> ImageSource:
    """.npz shard files, a folder of .npz shards, or a folder of images."""
    paths = [Path(p) for p in ([paths] if isinstance(paths, str | Path) else paths)]
    if not paths:
        raise ElmgenError("no sample files given")
    npz = []
    for p in paths:
        if p.is_dir():
            shards = sorted(p.glob("*.npz"))
            if len(paths) == 1 and not shards:
                return FolderImages(p)
            if not shards:
                raise ElmgenError(f"{p} holds no .npz shards; pass one folder of images or .npz files")
            npz += shards
        elif p.is_file() and p.suffix == ".npz":
            npz.append(p)
        else:
            raise ElmgenError(f"samples not found: {p}; pass .npz files (ADM layout) or a folder of images")
    return NpzImages(shares_in_order(npz))


def shares_in_order(paths: list[Path]) -> list[Path]:
    """`paths`; when they are the shares of a run's processes (`sampling.shard_name`), checked to be all of one
    run, complete, and put in rank order, which is a one-process run's order (a missing or a stray share would
    change the measure without a word)."""
    found = [SHARD_FILE.fullmatch(p.name) for p in paths]
    if not any(found):
        return paths
    runs = {(m["name"], int(m["world"])) for m in found if m}
    if len(runs) > 1 or not all(found):
        others = [p.name for p, m in zip(paths, found, strict=True) if not m]
        what = ", ".join(sorted(f"{name}.rank*-of-{world:05d}" for name, world in runs) + others[:1])
        raise ElmgenError(f"the samples mix the files of several runs ({what}); pass the files of one run")
    (name, world), ranks = runs.pop(), [int(m["rank"]) for m in found]
    if sorted(ranks) != list(range(world)):
        missing = sorted(set(range(world)) - set(ranks))
        raise ElmgenError(
            f"the samples lack {name}.rank{missing[0]:05d}-of-{world:05d}.npz, one of {world} processes' shares "
            "(that process did not finish); re-run 'elmgen sample' with the same settings"
            if missing
            else f"the samples name a share of {name} twice; pass each file once"
        )
    return [p for _, p in sorted(zip(ranks, paths, strict=True))]

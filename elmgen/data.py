"""Image data: Fashion-MNIST from Debian's IDX files, and class-per-folder image trees.

Every dataset yields uint8 images of shape (C, S, S) and integer labels; `to_float` maps
them to [-1, 1] for the networks and `to_uint8` maps network output back. `check_images` decodes
every file of an image folder at once; a small folder is checked so whenever it is loaded.
"""

from __future__ import annotations

import gzip
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from elmgen.errors import ElmgenError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
# An image folder of at most this many files is decoded in full when loaded (a few seconds), so a corrupt
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

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def images(self, idx) -> torch.Tensor:
        raise NotImplementedError


class FashionMNIST(ImageDataset):
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
            x = torch.nn.functional.interpolate(
                x.float(), size=(self.image_size, self.image_size), mode="bilinear", antialias=True
            ).round().clamp(0, 255).to(torch.uint8)
        return x.expand(-1, self.channels, -1, -1).contiguous()


class ImageFolder(ImageDataset):
    """`root/<class>/<image>`; images are centre-cropped to a square and resized."""

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
            raise ElmgenError(f"class folder {empty[0]} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}){more}; "
                              "add images or remove it")
        if len(files) <= CHECK_AT_LOAD_MAX_FILES:
            bad = find_bad_images(files)
            if bad:
                first = ", ".join(f"{path} ({reason})" for path, reason in bad[:3])
                raise ElmgenError(f"{len(bad)} corrupt or unreadable image(s) in {root}: {first}; remove or replace "
                                  f"them (run `elmgen check-data {root}` for the full list)")
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
        self.mode = {1: "L", 3: "RGB"}[channels]

    def load(self, i: int) -> np.ndarray:
        arr = np.asarray(center_crop_resize(open_image(self.files[i], self.mode), self.image_size), dtype=np.uint8)
        return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)

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


def interleave_classes(labels_N: np.ndarray) -> np.ndarray:
    """An order that takes one image of each class in turn (class folders list their images class by class)."""
    rank_N = np.zeros(len(labels_N), dtype=np.int64)
    for c in np.unique(labels_N):
        rank_N[labels_N == c] = np.arange((labels_N == c).sum())
    return np.lexsort((labels_N, rank_N))


def class_files(root: Path) -> tuple[list[str], list[Path], list[int], list[Path]]:
    """The classes (sub-folders; hidden ones are not classes) of an image folder, its image files, their
    labels, and the class folders that hold no image."""
    if not root.is_dir():
        raise ElmgenError(f"data folder not found: {root}; pass a folder with one sub-folder per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ElmgenError(f"{root} has no class sub-folders; expected {root}/<class name>/<image>.png|jpg")
    files, labels = [], []
    for label, cls in enumerate(classes):
        for f in sorted((root / cls).rglob("*")):
            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                files.append(f)
                labels.append(label)
    present = set(labels)
    return classes, files, labels, [root / c for label, c in enumerate(classes) if label not in present]


class BadImage(ElmgenError):
    """An image file that does not decode; `reason` is the decoder's complaint."""

    def __init__(self, path, reason: str):
        super().__init__(f"corrupt or unreadable image {path}: {reason}; remove or replace it")
        self.path, self.reason = str(path), reason


def open_image(path, mode: str | None = None) -> Image.Image:
    """The fully decoded image at `path` (converted to `mode` when given); BadImage when it does not decode."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert(mode) if mode else img
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(path, str(e) or type(e).__name__) from None


def _image_problem(path: Path) -> str | None:
    try:
        open_image(path)
    except BadImage as e:
        return e.reason
    return None


def find_bad_images(files: list[Path], workers: int | None = None) -> list[tuple[str, str]]:
    """(path, reason) of every file in `files` that does not decode, decoding in parallel threads
    (Pillow releases the GIL while decoding, and threads start at once)."""
    workers = workers or len(os.sched_getaffinity(0))
    with ThreadPoolExecutor(max(1, workers)) as pool:
        problems = pool.map(_image_problem, files)
        return [(str(f), p) for f, p in zip(files, problems, strict=True) if p is not None]


RESOLUTIONS = (32, 64, 128, 256)  # image sides the pipeline has recipes for
GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def inspect_folder(source: str | Path, samples: int = 64) -> tuple[int, int]:
    """(channels, image size) of a class folder, from up to `samples` of its images spread over the classes:
    3 channels when any of them has colour, else 1; the largest of RESOLUTIONS no larger than the median
    shorter side (at least the smallest resolution: smaller images are enlarged)."""
    source = Path(source)
    _, files, labels, _ = class_files(source / "train" if (source / "train").is_dir() else source)
    order = interleave_classes(np.asarray(labels, dtype=np.int64))
    picked = [files[i] for i in order[np.linspace(0, len(files) - 1, min(samples, len(files))).astype(int)]]
    colour, sides = False, []
    for f in picked:
        img = open_image(f)
        sides.append(min(img.size))
        if img.mode not in GREY_MODES:
            rgb = np.asarray(img.convert("RGB"), dtype=np.int16)
            colour |= bool(np.abs(rgb - rgb[..., :1]).max() > 8)  # grey saved as RGB is still grey
    side = float(np.median(sides))
    return (3 if colour else 1), max([r for r in RESOLUTIONS if r <= side] or [RESOLUTIONS[0]])


def check_images(source: str | Path, workers: int | None = None) -> list[tuple[str, str]]:
    """Decode every image of a class folder (its train/ and test/ splits when it has them) and return
    (path, reason) for every bad one: files that do not decode and class folders without images."""
    files, empty = folder_images(source)
    return [(str(folder), "class folder holds no images") for folder in empty] + find_bad_images(files, workers)


def folder_images(source: str | Path) -> tuple[list[Path], list[Path]]:
    """The image files of a class folder (of its train/ and test/ splits when it has them) and the class
    folders that hold none."""
    source = Path(source)
    files, empty = [], []
    for root in [source / s for s in ("train", "test") if (source / s).is_dir()] or [source]:
        _, found, _, no_images = class_files(root)
        files += found
        empty += no_images
    return files, empty


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    """ADM-style: shrink by powers of two with box filtering, resize with bicubic, then crop."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


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
        raise ElmgenError(f"{path} holds {kind} values, not unsigned bytes; pass images and integer labels 0-255 "
                          "as unsigned-byte IDX files")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ElmgenError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {body.size}")
    return body.reshape(shape)


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


class Subset(ImageDataset):
    def __init__(self, base: ImageDataset, indices):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = base.labels[self.indices]
        self.class_names = base.class_names
        self.name = f"{base.name}[:{len(self.indices)}]"

    def images(self, idx) -> torch.Tensor:
        return self.base.images(self.indices[np.asarray(idx)])


def to_float(images_BCHW: torch.Tensor) -> torch.Tensor:
    return images_BCHW.float().div(127.5).sub(1.0)


def to_uint8(images_BCHW: torch.Tensor) -> torch.Tensor:
    return images_BCHW.float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)

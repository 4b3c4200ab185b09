"""Image files: listing a class folder, decoding (every failure one `BadImage`), checking a whole folder at
once, detecting its colour and resolution, and the ADM centre crop."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from elmgen.errors import ElmgenError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


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


def interleave_classes(labels_N: np.ndarray) -> np.ndarray:
    """An order that takes one image of each class in turn (class folders list their images class by class)."""
    rank_N = np.zeros(len(labels_N), dtype=np.int64)
    for c in np.unique(labels_N):
        rank_N[labels_N == c] = np.arange((labels_N == c).sum())
    return np.lexsort((labels_N, rank_N))


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


def load_pixels(path) -> np.ndarray:
    """The decoded image at `path` as uint8 pixels: (H, W) when it is 8-bit grey, else (H, W, 3)."""
    img = open_image(path)
    return np.asarray(img.convert("L" if img.mode in ("1", "L", "LA") else "RGB"))


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


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    """ADM-style: shrink by powers of two with box filtering, resize with bicubic, then crop."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


def image_array(path, channels: int, size: int) -> np.ndarray:
    """An image file as a data set holds it: grey (1) or RGB (3), centre-cropped to `size` (uint8, C H W)."""
    arr = np.asarray(center_crop_resize(open_image(path, {1: "L", 3: "RGB"}[channels]), size), dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)

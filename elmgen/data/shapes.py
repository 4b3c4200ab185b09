"""A synthetic class folder: coloured shapes whose class is the shape, never the colour.

`elmgen shapes --out DIR` writes DIR/<shape>/<index>.png, the kind of folder a researcher brings:
it lets the pipeline's own-data path (`elmgen run --data DIR`) be tested and measured without any
download. Colours, size, position and rotation are random, so a model has to learn shape; `jitter`
narrows the pose (size, position, rotation) towards one centred, upright shape, colours staying random.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from elmgen.errors import ElmgenError

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
SUPERSAMPLE = 4  # shapes are drawn this much larger and box-filtered down, for clean edges
# the corners of the RGB cube: any two differ by at least 255 in one channel, so every pair is visible
PALETTE = np.array(
    [[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255], [255, 0, 255]]
)


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape of radius `r` centred at (cx, cy), rotated by `angle`."""
    if kind == "square":
        pts = [(math.cos(a), math.sin(a)) for a in np.arange(4) * math.pi / 2 + math.pi / 4]
    elif kind == "diamond":  # a rhombus, taller than wide: not a rotated square
        pts = [(0.0, -1.0), (0.6, 0.0), (0.0, 1.0), (-0.6, 0.0)]
    elif kind == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in np.arange(3) * 2 * math.pi / 3 - math.pi / 2]
    elif kind == "cross":
        w = 0.35
        pts = [
            (-w, -1),
            (w, -1),
            (w, -w),
            (1, -w),
            (1, w),
            (w, w),
            (w, 1),
            (-w, 1),
            (-w, w),
            (-1, w),
            (-1, -w),
            (-w, -w),
        ]
    else:
        raise ValueError(kind)
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _colours(rng: np.random.Generator, palette: int) -> tuple[np.ndarray, np.ndarray]:
    """(background, shape colour): two distinct colours of the first `palette` of PALETTE, or any two RGB
    colours far enough apart when `palette` is 0."""
    if palette:
        background, colour = PALETTE[rng.choice(palette, 2, replace=False)]
        return background, colour
    background = rng.integers(0, 256, 3)
    colour = rng.integers(0, 256, 3)
    while np.abs(colour - background).sum() < 200:  # keep the shape visible against its background
        colour = rng.integers(0, 256, 3)
    return background, colour


def _spread(rng: np.random.Generator, jitter: float) -> float:
    """A uniform draw from the unit range shrunk about its middle by `jitter` (0: always 0.5)."""
    return 0.5 + jitter * (rng.uniform() - 0.5)


def draw_shape(kind: str, size: int, rng: np.random.Generator, palette: int = 0, jitter: float = 1.0) -> Image.Image:
    """One RGB image of `kind` with a random colour and background, and a pose as random as `jitter` says."""
    big = size * SUPERSAMPLE
    background, colour = _colours(rng, palette)
    img = Image.new("RGB", (big, big), tuple(int(v) for v in background))
    draw = ImageDraw.Draw(img)
    # jitter 1: radius 0.22-0.4 of the side, anywhere it fits, tilted up to 22.5 degrees; 0: 0.31, centred, upright
    r = big * (0.22 + 0.18 * _spread(rng, jitter))
    cx, cy = (r + (big - 2 * r) * _spread(rng, jitter) for _ in range(2))
    fill = tuple(int(v) for v in colour)
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        inner = 0.55 * r
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=tuple(int(v) for v in background))
    else:
        draw.polygon(_polygon(kind, cx, cy, r, math.pi / 4 * (_spread(rng, jitter) - 0.5)), fill=fill)
    return img.resize((size, size), Image.BOX)


def make_shapes(
    out_dir: str | Path,
    num_classes: int = 4,
    per_class: int = 1000,
    size: int = 32,
    seed: int = 0,
    palette: int = 0,
    jitter: float = 1.0,
) -> Path:
    """Write `per_class` images of each of the first `num_classes` shapes to out_dir/<shape>/NNNNN.png, in
    colours of the first `palette` corners of the RGB cube (2-8), or of any colour (0), posed as randomly as
    `jitter` (0-1) says."""
    if not 2 <= num_classes <= len(SHAPES):
        raise ElmgenError(f"--classes must be in 2..{len(SHAPES)} ({', '.join(SHAPES)}), not {num_classes}")
    if palette and not 2 <= palette <= len(PALETTE):
        raise ElmgenError(f"--palette must be 0 (any colour) or in 2..{len(PALETTE)}, not {palette}")
    if not 0 <= jitter <= 1:
        raise ElmgenError(f"--jitter must be in 0..1 (1: any size, place, tilt; 0: centred, upright), not {jitter}")
    if per_class < 1 or size < 8:
        raise ElmgenError(f"need at least 1 image per class and 8 px (got {per_class}, {size} px)")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ElmgenError(f"{out} is not empty; pass a new folder for the shapes")
    for label, kind in enumerate(SHAPES[:num_classes]):
        rng = np.random.default_rng([seed, label])  # each class its own stream: adding classes keeps the others
        folder = out / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw_shape(kind, size, rng, palette, jitter).save(folder / f"{i:05d}.png")
    return out

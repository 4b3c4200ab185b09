"""Reference statistics for FID and precision/recall: computed once from a data set or images, saved in
pytorch-fid's layout, and checked to come from the feature space they are compared in."""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from elmgen.data import DataConfig
from elmgen.errors import ElmgenError
from elmgen.evaluation.features import extract
from elmgen.evaluation.metrics import feature_stats, knn_radii
from elmgen.evaluation.sources import DatasetImages, ImageSource, NpzImages
from elmgen.io import atomic_savez


@dataclass
class RefStats:
    """What a reference contributes to FID and precision/recall; saved as .npz in pytorch-fid's layout (mu, sigma)."""

    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    count: int  # images the statistics were computed from
    source: str  # what those images were
    feature_space: dict | None  # None: a stats file from another tool (e.g. pytorch-fid), not verifiable
    feats: np.ndarray | None = None  # (N, D) float32, for precision/recall
    radii: np.ndarray | None = None  # (N,) k-NN radii of feats, computed once
    k: int = 0  # the k of those radii


def reference_stats(extractor, source: ImageSource, batch_size: int = 250, k: int = 3) -> RefStats:
    feats_ND, _ = extract(extractor, source, batch_size)
    mu, sigma = feature_stats(feats_ND)
    return RefStats(mu, sigma, len(feats_ND), source.name, extractor.feature_space, feats_ND, knn_radii(feats_ND, k), k)


def save_ref_stats(stats: RefStats, path: str | Path) -> Path:
    path = Path(path)
    if path.suffix != ".npz":
        raise ElmgenError(f"reference statistics are written as .npz, not {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {} if stats.feats is None else {"feats": stats.feats, "radii": stats.radii, "k": stats.k}
    atomic_savez(
        path,
        mu=stats.mu,
        sigma=stats.sigma,
        count=stats.count,
        source=stats.source,
        feature_space=json.dumps(stats.feature_space),
        **extra,
    )
    return path


def is_stats_file(path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return {"mu.npy", "sigma.npy"} <= set(zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_ref_stats(path) -> RefStats:
    """Statistics written by `save_ref_stats`, or any .npz with pytorch-fid's `mu` and `sigma`."""
    if not is_stats_file(path):
        raise ElmgenError(f"{path} is not a statistics file: expected an .npz with 'mu' and 'sigma'")
    with np.load(path, allow_pickle=False) as z:
        feats = z["feats"] if "feats" in z else None
        return RefStats(
            mu=z["mu"].astype(np.float64),
            sigma=z["sigma"].astype(np.float64),
            count=int(z["count"]) if "count" in z else 0,
            source=str(z["source"]) if "source" in z else str(path),
            feature_space=json.loads(str(z["feature_space"])) if "feature_space" in z else None,
            feats=feats,
            radii=z["radii"] if feats is not None else None,
            k=int(z["k"]) if feats is not None else 0,
        )


def open_reference(
    spec: str | Path | DataConfig, extractor, batch_size: int = 250, k: int = 3, workers: int | None = None
) -> RefStats:
    """A data set (DataConfig, 'fashion-mnist' or a class folder; decoded by `workers` processes, None: the
    default), an .npz of images, or an .npz of statistics."""
    if isinstance(spec, str | Path) and Path(spec).suffix != ".npz":
        spec = DataConfig(source=str(spec))
    if isinstance(spec, DataConfig):
        images = DatasetImages(spec, extractor.image_size, extractor.channels, workers)
        return reference_stats(extractor, images, batch_size, k)
    path = Path(spec)
    if not path.is_file():
        raise ElmgenError(f"reference file not found: {path}")
    if is_stats_file(path):
        return check_stats(load_ref_stats(path), extractor, path)
    return reference_stats(extractor, NpzImages([path]), batch_size, k)


def check_stats(stats: RefStats, extractor, path) -> RefStats:
    """Statistics are only comparable in the feature space they were made in."""
    space = extractor.feature_space
    if stats.feature_space is not None and stats.feature_space.get("fingerprint") != space["fingerprint"]:
        raise ElmgenError(
            f"{path} was computed with {stats.feature_space.get('name')} {stats.feature_space.get('fingerprint')}, "
            f"not with this {space['name']} {space['fingerprint']}; recompute it with 'elmgen ref-stats'"
        )
    D = space["feature_dim"]
    if stats.mu.shape != (D,) or stats.sigma.shape != (D, D):
        raise ElmgenError(
            f"{path} holds statistics of shapes mu {stats.mu.shape}, sigma {stats.sigma.shape} but "
            f"{space['name']} makes {D}-d features: expected ({D},) and ({D}, {D})"
        )
    return stats

"""Evaluation: reconstruction quality and code usage of tokenizers; FID, Inception Score, precision/recall and
class accuracy of generated samples."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import scipy.linalg
import scipy.special
import torch
from PIL import Image
from tqdm.auto import tqdm

from elmgen.checkpoint import atomic_write
from elmgen.data import (
    IMAGE_SUFFIXES,
    DataConfig,
    ImageDataset,
    center_crop_resize,
    load_dataset,
    open_image,
    to_float,
)
from elmgen.errors import ElmgenError
from elmgen.vocab import Vocab, cells_to_bits, cells_to_subcodes


def psnr(x_BCHW: torch.Tensor, y_BCHW: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = (x_BCHW.float() - y_BCHW.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))


def ssim(x_BCHW: torch.Tensor, y_BCHW: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM of images in [-1, 1] (Wang et al. 2004: Gaussian window, population statistics, mean
    over the valid positions and the channels; the window shrinks to fit small images)."""
    x, y = x_BCHW.float(), y_BCHW.float()
    C, win = x.shape[1], min(window, *x.shape[-2:])
    g = torch.exp(-((torch.arange(win, device=x.device) - (win - 1) / 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(C, 1, win, win)

    def blur(t):
        return torch.nn.functional.conv2d(t, kernel, groups=C)

    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y, cov = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2, blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2  # the usual constants for a data range of 2
    s = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


def code_usage(cells: np.ndarray, num_codes: int) -> dict:
    """Distinct codes seen, that count over the most that could be seen (the code space or the number of
    cells, whichever is smaller), and the perplexity exp(entropy) of the code histogram."""
    counts = np.unique(cells, return_counts=True)[1]
    p = counts / counts.sum()
    return {"distinct_codes": int(counts.size), "code_usage": counts.size / min(num_codes, int(cells.size)),
            "perplexity": float(np.exp(-(p * np.log(p)).sum()))}


def subcode_usage(cells: np.ndarray, vocab: Vocab) -> list[float]:
    """Share of each sub-code vocabulary's entries that occur."""
    sub = cells_to_subcodes(torch.from_numpy(cells.reshape(-1)), vocab).numpy()
    return [np.unique(sub[:, j]).size / vocab.size for j in range(vocab.num_subcodes)]


def bit_stats(bits_NK: np.ndarray) -> dict:
    """Per-bit mean (0.5 is balanced) and the mean binary entropy in bits."""
    p = bits_NK.mean(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    h = np.nan_to_num(h)
    return {"bit_mean": p.round(4).tolist(), "bit_entropy": float(h.mean()), "bit_entropies": h.round(4).tolist()}


@torch.no_grad()
def evaluate_tokenizer(model, dataset: ImageDataset, batch_size: int = 256, limit: int | None = None,
                       vocab: Vocab | None = None) -> dict:
    """PSNR and SSIM of reconstructions from deterministic codes, and code usage on `dataset`: of the
    code space (with perplexity), of each sub-code vocabulary of `vocab` (default: the tokenizer's), per bit."""
    model.eval()
    device = next(model.parameters()).device
    n = len(dataset) if limit is None else min(limit, len(dataset))
    K = model.code_bits
    vocab = Vocab.for_bits(str(vocab or model.default_vocab), K)
    psnrs, ssims, cells = [], [], []
    for start in range(0, n, batch_size):
        x = to_float(dataset.images(np.arange(start, min(n, start + batch_size)))).to(device)
        grid = x.shape[-1] // model.cfg.downsample
        cells_BL = model.encode_cells(x)
        recon = model.decode_cells(cells_BL, grid).clamp(-1, 1)
        psnrs.append(psnr(recon, x).cpu())
        ssims.append(ssim(recon, x).cpu())
        cells.append(cells_BL.cpu().numpy())
    all_cells, psnr_N = np.concatenate(cells), torch.cat(psnrs).numpy()
    labels_N = np.asarray(dataset.labels[:n])
    bits_NK = cells_to_bits(torch.from_numpy(all_cells.reshape(1, -1)), K, 1, all_cells.size).reshape(K, -1).T
    return {
        "images": n,
        "psnr": float(psnr_N.mean()),
        # one per class (None for a class with no image here): a tokenizer can serve some classes worse
        "psnr_per_class": [float(psnr_N[labels_N == c].mean()) if (labels_N == c).any() else None
                           for c in range(len(getattr(dataset, "class_names", ())) or labels_N.max(initial=-1) + 1)],
        "ssim": float(torch.cat(ssims).mean()),
        "quantizer": model.cfg.quantizer,
        "bits": K,
        "num_codes": model.num_codes,
        "grid": [grid, grid],
        **code_usage(all_cells, model.num_codes),
        "vocab": str(vocab),
        "subcode_usage": subcode_usage(all_cells, vocab),
        **bit_stats(bits_NK.numpy()),
    }


# --- generative metrics on features ---------------------------------------------------------------------------------
# Samples are measured in a feature space that every report names (`feature_space`): the project's own classifier
# (offline, `elmgen.classifier`) or the standard FID Inception network from a local weights file.


def feature_stats(feats_ND: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) in float64, as pytorch-fid computes them."""
    feats_ND = np.asarray(feats_ND, dtype=np.float64)
    if feats_ND.ndim != 2 or len(feats_ND) < 2:
        raise ElmgenError(f"feature statistics need at least 2 feature vectors, got an array of shape {feats_ND.shape}")
    return feats_ND.mean(0), np.atleast_2d(np.cov(feats_ND, rowvar=False))


def _sqrtm(a_DD: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():  # scipy warns on (near-)singular input; the caller checks the result itself
        warnings.simplefilter("ignore")
        return scipy.linalg.sqrtm(a_DD)


def frechet_distance(mu1_D, sigma1_DD, mu2_D, sigma2_DD, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64.

    A singular product (e.g. fewer samples than dimensions) can make the root non-finite or inaccurate: then both
    covariances get `eps` added to their diagonal. A numerically complex root keeps its real part when the imaginary
    part is negligible, and is an error otherwise.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1_D, np.float64)), np.atleast_1d(np.asarray(mu2_D, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1_DD, np.float64)), np.atleast_2d(np.asarray(sigma2_DD, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ElmgenError(f"feature statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs "
                          f"{s2.shape}; were they made with the same feature extractor?")
    product = s1 @ s2
    covmean = _sqrtm(product)
    residual = np.linalg.norm(covmean @ covmean - product) / max(np.linalg.norm(product), 1e-300)
    if not np.isfinite(covmean).all() or residual > 1e-4:
        offset = np.eye(len(mu1)) * eps
        covmean = _sqrtm((s1 + offset) @ (s2 + offset))
    if not np.isfinite(covmean).all():
        raise ElmgenError("the matrix square root in the Frechet distance is not finite even after regularisation")
    if np.iscomplexobj(covmean):
        worst = np.abs(covmean.imag).max()
        if worst > 1e-3 * max(1.0, np.abs(covmean.real).max()):
            raise ElmgenError(f"the matrix square root in the Frechet distance has a large imaginary part "
                              f"({worst:.3g}); the covariances are degenerate: use more samples")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def inception_score(probs_NC: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) on each of `splits` parts: (mean, std) over the parts.

    The parts are cut from a fixed shuffle of the samples: class-balanced sample files are written class
    by class, and consecutive parts would each hold one class (an IS near 1 whatever the quality)."""
    probs_NC = np.asarray(probs_NC, dtype=np.float64)
    if len(probs_NC) < splits:
        raise ElmgenError(f"the Inception Score over {splits} splits needs at least {splits} samples, "
                          f"got {len(probs_NC)}")
    shuffled_NC = probs_NC[np.random.default_rng(0).permutation(len(probs_NC))]
    scores = []
    for part_NC in np.array_split(shuffled_NC, splits):
        kl_N = scipy.special.rel_entr(part_NC, part_NC.mean(0, keepdims=True)).sum(1)
        scores.append(np.exp(kl_N.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _sq_dists(a_MD: np.ndarray, b_ND: np.ndarray) -> np.ndarray:
    return np.maximum((a_MD**2).sum(1)[:, None] - 2 * a_MD @ b_ND.T + (b_ND**2).sum(1)[None], 0.0)


def _rows_per_block(n: int) -> int:
    return max(1, (1 << 25) // max(n, 1))  # about 256 MB of float64 distances at a time


def knn_radii(feats_ND: np.ndarray, k: int = 3) -> np.ndarray:
    """Distance from each point to its k-th nearest neighbour among the others: the radii of the k-NN manifold."""
    feats_ND = np.asarray(feats_ND, dtype=np.float64)
    if len(feats_ND) <= k:
        raise ElmgenError(f"a {k}-NN manifold needs more than {k} feature vectors, got {len(feats_ND)}")
    radii_N, step = np.empty(len(feats_ND)), _rows_per_block(len(feats_ND))
    for s in range(0, len(feats_ND), step):
        d2 = _sq_dists(feats_ND[s:s + step], feats_ND)
        radii_N[s:s + step] = np.partition(d2, k, axis=1)[:, k]  # entry 0 is the point itself
    return np.sqrt(radii_N)


def in_manifold(points_MD: np.ndarray, centres_ND: np.ndarray, radii_N: np.ndarray) -> np.ndarray:
    """(M,) bool: does each point fall inside (or on) at least one ball (centre, radius)?"""
    points_MD, centres_ND = np.asarray(points_MD, np.float64), np.asarray(centres_ND, np.float64)
    r2_N, step = np.asarray(radii_N, np.float64) ** 2, _rows_per_block(len(centres_ND))
    inside = np.empty(len(points_MD), dtype=bool)
    for s in range(0, len(points_MD), step):
        inside[s:s + step] = (_sq_dists(points_MD[s:s + step], centres_ND) <= r2_N[None]).any(1)
    return inside


def precision_recall(real_ND: np.ndarray, fake_MD: np.ndarray, k: int = 3,
                     real_radii_N: np.ndarray | None = None) -> dict:
    """Improved precision/recall with k-NN manifolds, as in the ADM evaluation suite: precision is the share of
    samples inside the real manifold, recall the share of real points inside the samples' manifold."""
    if real_radii_N is None:
        real_radii_N = knn_radii(real_ND, k)
    return {"precision": float(in_manifold(fake_MD, real_ND, real_radii_N).mean()),
            "recall": float(in_manifold(real_ND, fake_MD, knn_radii(fake_MD, k)).mean())}


def class_accuracy(probs_NC: np.ndarray, labels_N: np.ndarray, class_names: list[str]) -> dict:
    """Share of images the classifier assigns to their own class, overall and per class (keyed by class name)."""
    preds_N, labels_N = np.asarray(probs_NC).argmax(1), np.asarray(labels_N, dtype=np.int64)
    if len(labels_N) and (labels_N.min() < 0 or labels_N.max() >= len(class_names)):
        raise ElmgenError(f"sample labels range over {labels_N.min()}..{labels_N.max()} but the classifier knows "
                          f"{len(class_names)} classes")
    return {"class_accuracy": float((preds_N == labels_N).mean()),
            "per_class_accuracy": {class_names[c]: float((preds_N[labels_N == c] == c).mean())
                                   for c in np.unique(labels_N)}}


# --- images to measure ----------------------------------------------------------------------------------------------


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
        images_NHWC = np.stack([
            np.asarray(center_crop_resize(Image.fromarray(img[..., 0] if channels == 1 else img), size))
            .reshape(size, size, channels) for img in images_NHWC
        ])
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
                        raise ElmgenError(f"{path} holds no arr_0 (expected ADM layout: arr_0 uint8 NHWC images, "
                                          "arr_1 labels)")
                    with zf.open("arr_0.npy") as f:
                        shape, fortran, dtype = _npy_header(f, str(path))
                with np.load(path, allow_pickle=False) as z:
                    labels.append(z["arr_1"].reshape(-1) if "arr_1" in z else None)
            except (zipfile.BadZipFile, OSError, ValueError) as e:
                raise ElmgenError(f"cannot read {path} as an .npz file: {e}") from None
            if dtype != np.uint8 or fortran or len(shape) not in (3, 4) or shape[0] == 0:
                raise ElmgenError(f"{path}: arr_0 is {dtype} of shape {shape}; expected uint8 images (N, H, W, C) "
                                  "with N >= 1")
            self.counts.append(shape[0])
            if labels[-1] is not None and (labels[-1].dtype.kind not in "iu" or len(labels[-1]) != shape[0]):
                raise ElmgenError(f"{path}: arr_1 holds {len(labels[-1])} {labels[-1].dtype} labels for {shape[0]} "
                                  "images; expected one integer class id per image")
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

    def load(self, path: Path) -> np.ndarray:
        img = open_image(path)
        return np.asarray(img.convert("L" if img.mode in ("1", "L", "LA") else "RGB"))

    def batches(self, batch_size: int, size: int, channels: int) -> Iterator[np.ndarray]:
        for start in range(0, len(self.files), batch_size):
            yield np.concatenate([conform(self.load(f)[None], size, channels, str(f))
                                  for f in self.files[start:start + batch_size]])


class DatasetImages(ImageSource):
    """A data set (Fashion-MNIST, a class folder) loaded at the extractor's resolution and channels."""

    def __init__(self, cfg: DataConfig, size: int, channels: int):
        self.dataset = load_dataset(replace(cfg, image_size=size, channels=channels))
        self.labels, self.name = self.dataset.labels, self.dataset.name

    def __len__(self) -> int:
        return len(self.dataset)

    def batches(self, batch_size: int, size: int, channels: int) -> Iterator[np.ndarray]:
        for start in range(0, len(self.dataset), batch_size):
            batch = self.dataset.images(np.arange(start, min(len(self.dataset), start + batch_size))).numpy()
            yield conform(batch.transpose(0, 2, 3, 1), size, channels, self.name)


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
    return NpzImages(npz)


# --- feature extractors ---------------------------------------------------------------------------------------------

INCEPTION_WEIGHTS_ENV = "ELMGEN_INCEPTION_WEIGHTS"
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
ADM_IMAGE_SIZE = 256  # ImageNet protocol: every image is ADM-centre-cropped to 256 before the network


class ClassifierFeatures:
    """The project's classifier: penultimate features and class probabilities (offline)."""

    def __init__(self, path, device="cpu"):
        from elmgen.classifier import load_classifier

        self.model, meta = load_classifier(path, device)
        self.image_size, self.channels = meta["image_size"], meta["channels"]
        self.class_names = meta["class_names"]
        self.feature_space = {
            "name": "elmgen-classifier", "fingerprint": meta["fingerprint"], "path": meta["path"],
            "dataset": meta["dataset"], "image_size": self.image_size, "channels": self.channels,
            "feature_dim": self.model.cfg.feature_dim,
        }

    def __call__(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.features_and_probs(images_BCHW)


class InceptionFeatures:
    """The FID Inception-v3 (TF 2015-12-05 graph as ported by torch-fidelity): 2048-d pool features and softmax over
    its 1008 logits, on 3-channel images centre-cropped to 256. Its classes are not the data set's, so it gives no
    class accuracy."""

    image_size, channels, class_names = ADM_IMAGE_SIZE, 3, None

    def __init__(self, weights: str | Path | None, device="cpu"):
        weights = weights or os.environ.get(INCEPTION_WEIGHTS_ENV)
        # checked before the optional library is imported, so this message is what a user without it sees too
        if not weights or not Path(weights).is_file():
            where = f"{weights} does not exist" if weights else "no weights file given"
            raise ElmgenError(
                f"the Inception backend needs the FID Inception weights file {INCEPTION_WEIGHTS_FILE} "
                f"(torch-fidelity's port of pytorch-fid's Inception), which cannot be downloaded here: {where}; "
                f"pass --inception-weights FILE or set {INCEPTION_WEIGHTS_ENV}"
            )
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as e:
            raise ElmgenError(f"the Inception backend needs torch-fidelity ({e}); "
                              "install it with: pip install 'elmgen[inception]'") from None
        try:
            # Read once as plain tensors first: a file that needs more is refused here, whatever the
            # torch version lets the library's own load do.
            torch.load(weights, map_location="cpu", weights_only=True)
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                   feature_extractor_weights_path=str(weights)).to(device)
        except (RuntimeError, OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as e:
            raise ElmgenError(f"{weights} does not hold the FID Inception weights: {str(e).splitlines()[0]}") from None
        self.device = device
        self.feature_space = {
            "name": "inception-v3-fid (torch-fidelity)", "fingerprint": file_hash(weights),
            "path": str(Path(weights).resolve()), "image_size": self.image_size, "channels": 3, "feature_dim": 2048,
        }

    @torch.no_grad()
    def __call__(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats_BD, logits_BC = self.net(images_BCHW.to(self.device))
        return feats_BD, logits_BC.softmax(-1)


def file_hash(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def load_extractor(backend: str = "classifier", classifier=None, inception_weights=None, device="cpu"):
    """'classifier' (a run of `elmgen train-classifier`) or 'inception' (a local FID Inception weights file)."""
    if backend == "classifier":
        if classifier is None:
            raise ElmgenError("the classifier backend needs --classifier RUN (train one with "
                              "'elmgen train-classifier'), or choose --backend inception")
        return ClassifierFeatures(classifier, device)
    if backend == "inception":
        return InceptionFeatures(inception_weights, device)
    raise ElmgenError(f"unknown feature backend {backend!r}; use 'classifier' or 'inception'")


def extract(extractor, source: ImageSource, batch_size: int = 250) -> tuple[np.ndarray, np.ndarray]:
    """Features (N, D) and class probabilities (N, C) of every image of `source`, as float32."""
    feats, probs = [], []
    batches = source.batches(batch_size, extractor.image_size, extractor.channels)
    for batch in tqdm(batches, total=-(-len(source) // batch_size), desc="features", unit="batch"):
        f_BD, p_BC = extractor(torch.from_numpy(batch))
        feats.append(f_BD.float().cpu().numpy())
        probs.append(p_BC.float().cpu().numpy())
    return np.concatenate(feats), np.concatenate(probs)


# --- reference statistics -------------------------------------------------------------------------------------------


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
    atomic_write(path, lambda f: np.savez(f, mu=stats.mu, sigma=stats.sigma, count=stats.count, source=stats.source,
                                          feature_space=json.dumps(stats.feature_space), **extra))
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
            mu=z["mu"].astype(np.float64), sigma=z["sigma"].astype(np.float64),
            count=int(z["count"]) if "count" in z else 0, source=str(z["source"]) if "source" in z else str(path),
            feature_space=json.loads(str(z["feature_space"])) if "feature_space" in z else None,
            feats=feats, radii=z["radii"] if feats is not None else None, k=int(z["k"]) if feats is not None else 0,
        )


def open_reference(spec: str | Path | DataConfig, extractor, batch_size: int = 250, k: int = 3) -> RefStats:
    """A data set (DataConfig, 'fashion-mnist' or a class folder), an .npz of images, or an .npz of statistics."""
    if isinstance(spec, DataConfig):
        return reference_stats(extractor, DatasetImages(spec, extractor.image_size, extractor.channels), batch_size, k)
    path = Path(spec)
    if path.suffix == ".npz":
        if not path.is_file():
            raise ElmgenError(f"reference file not found: {path}")
        if is_stats_file(path):
            return check_stats(load_ref_stats(path), extractor, path)
        return reference_stats(extractor, NpzImages([path]), batch_size, k)
    return reference_stats(extractor, DatasetImages(DataConfig(source=str(spec)), extractor.image_size,
                                                    extractor.channels), batch_size, k)


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
        raise ElmgenError(f"{path} holds statistics of shapes mu {stats.mu.shape}, sigma {stats.sigma.shape} but "
                          f"{space['name']} makes {D}-d features: expected ({D},) and ({D}, {D})")
    return stats


def evaluate_samples(samples, reference, extractor, k: int = 3, splits: int = 10, batch_size: int = 250) -> dict:
    """FID, Inception Score, precision/recall and (for labelled samples and the classifier) class accuracy.

    samples: an ImageSource, or .npz shard paths / a folder of shards / a folder of images (see `open_samples`);
    reference: a RefStats, a DataConfig, or a path accepted by `open_reference`. The result names the feature space
    (extractor and fingerprint) and the sample and reference counts; JSON-able.
    """
    source = samples if isinstance(samples, ImageSource) else open_samples(samples)
    ref = reference if isinstance(reference, RefStats) else open_reference(reference, extractor, batch_size, k)
    feats_ND, probs_NC = extract(extractor, source, batch_size)
    mu, sigma = feature_stats(feats_ND)
    is_mean, is_std = inception_score(probs_NC, splits)
    out = {
        "feature_space": extractor.feature_space,
        "samples": source.name, "num_samples": len(source),
        "reference": ref.source, "num_reference": ref.count,
        "fid": frechet_distance(mu, sigma, ref.mu, ref.sigma),
        "inception_score": is_mean, "inception_score_std": is_std, "is_splits": splits,
    }
    if ref.feature_space is None:
        out["reference_feature_space"] = "unverified: the statistics file names no feature extractor"
    if ref.feats is not None:
        out.update(precision_recall(ref.feats, feats_ND, k, ref.radii if ref.k == k else None), pr_k=k)
    if source.labels is not None and extractor.class_names is not None:
        out.update(class_accuracy(probs_NC, source.labels, extractor.class_names))
    return out

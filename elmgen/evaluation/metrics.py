"""Metrics as pure functions of tensors and arrays: reconstruction quality (PSNR, SSIM) and code usage of
tokenizers; FID, Inception Score, precision/recall and class accuracy from features and class probabilities.

Samples are measured in a feature space that every report names (`feature_space`): the project's own
classifier (offline, `elmgen.models.classifier`) or the standard FID Inception network from a local weights file.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import scipy.special
import torch

from elmgen.errors import ElmgenError
from elmgen.vocab import Vocab, cells_to_subcodes


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
    return {
        "distinct_codes": int(counts.size),
        "code_usage": counts.size / min(num_codes, int(cells.size)),
        "perplexity": float(np.exp(-(p * np.log(p)).sum())),
    }


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
        raise ElmgenError(
            f"feature statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs "
            f"{s2.shape}; were they made with the same feature extractor?"
        )
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
            raise ElmgenError(
                f"the matrix square root in the Frechet distance has a large imaginary part "
                f"({worst:.3g}); the covariances are degenerate: use more samples"
            )
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def inception_score(probs_NY: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) on each of `splits` parts: (mean, std) over the parts.

    The parts are cut from a fixed shuffle of the samples: class-balanced sample files are written class
    by class, and consecutive parts would each hold one class (an IS near 1 whatever the quality)."""
    probs_NY = np.asarray(probs_NY, dtype=np.float64)
    if len(probs_NY) < splits:
        raise ElmgenError(
            f"the Inception Score over {splits} splits needs at least {splits} samples, got {len(probs_NY)}"
        )
    shuffled_NY = probs_NY[np.random.default_rng(0).permutation(len(probs_NY))]
    scores = []
    for part_NY in np.array_split(shuffled_NY, splits):
        kl_N = scipy.special.rel_entr(part_NY, part_NY.mean(0, keepdims=True)).sum(1)
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
        d2 = _sq_dists(feats_ND[s : s + step], feats_ND)
        radii_N[s : s + step] = np.partition(d2, k, axis=1)[:, k]  # entry 0 is the point itself
    return np.sqrt(radii_N)


def in_manifold(points_MD: np.ndarray, centres_ND: np.ndarray, radii_N: np.ndarray) -> np.ndarray:
    """(M,) bool: does each point fall inside (or on) at least one ball (centre, radius)?"""
    points_MD, centres_ND = np.asarray(points_MD, np.float64), np.asarray(centres_ND, np.float64)
    r2_N, step = np.asarray(radii_N, np.float64) ** 2, _rows_per_block(len(centres_ND))
    inside = np.empty(len(points_MD), dtype=bool)
    for s in range(0, len(points_MD), step):
        inside[s : s + step] = (_sq_dists(points_MD[s : s + step], centres_ND) <= r2_N[None]).any(1)
    return inside


def precision_recall(
    real_ND: np.ndarray, fake_MD: np.ndarray, k: int = 3, real_radii_N: np.ndarray | None = None
) -> dict:
    """Improved precision/recall with k-NN manifolds, as in the ADM evaluation suite: precision is the share of
    samples inside the real manifold, recall the share of real points inside the samples' manifold."""
    if real_radii_N is None:
        real_radii_N = knn_radii(real_ND, k)
    return {
        "precision": float(in_manifold(fake_MD, real_ND, real_radii_N).mean()),
        "recall": float(in_manifold(real_ND, fake_MD, knn_radii(fake_MD, k)).mean()),
    }


def class_scores(probs_NY: np.ndarray, labels_N: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """Each image's scores, whose means are the class figures (a paired test compares two runs image by image):
    class_accuracy 1.0 where the classifier picks the image's own class, else 0.0; class_confidence the
    probability it gives that class."""
    probs_NY, labels_N = np.asarray(probs_NY), np.asarray(labels_N, dtype=np.int64)
    if len(labels_N) and (labels_N.min() < 0 or labels_N.max() >= num_classes):
        raise ElmgenError(
            f"sample labels range over {labels_N.min()}..{labels_N.max()} but the classifier knows "
            f"{num_classes} classes"
        )
    own_N = probs_NY[np.arange(len(labels_N)), labels_N]
    return {
        "class_accuracy": (probs_NY.argmax(1) == labels_N).astype(np.float64),
        "class_confidence": own_N.astype(np.float64),
    }


def class_accuracy(probs_NY: np.ndarray, labels_N: np.ndarray, class_names: list[str]) -> dict:
    """Share of images the classifier assigns to their own class, overall and per class (keyed by class name), and
    the mean probability it gives their own class (class_confidence)."""
    scores, labels_N = class_scores(probs_NY, labels_N, len(class_names)), np.asarray(labels_N, dtype=np.int64)
    correct_N = scores["class_accuracy"]
    return {
        "class_accuracy": float(correct_N.mean()),
        "class_confidence": float(scores["class_confidence"].mean()),
        "per_class_accuracy": {class_names[c]: float(correct_N[labels_N == c].mean()) for c in np.unique(labels_N)},
    }

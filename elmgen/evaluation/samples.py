"""Generated samples scored against a reference in a named feature space."""

from __future__ import annotations

import numpy as np

from elmgen.evaluation.features import extract
from elmgen.evaluation.metrics import (
    class_accuracy,
    class_scores,
    feature_stats,
    frechet_distance,
    in_manifold,
    inception_score,
    knn_radii,
    precision_recall,
)
from elmgen.evaluation.reference import RefStats, open_reference
from elmgen.evaluation.sources import ImageSource, open_samples


def evaluate_samples(
    samples,
    reference,
    extractor,
    k: int = 3,
    splits: int = 10,
    batch_size: int = 250,
    per_sample: bool = False,
    workers: int | None = None,
) -> dict:
    """FID, Inception Score, precision/recall and (for labelled samples and the classifier) class accuracy.

    samples: an ImageSource, or .npz shard paths / a folder of shards / a folder of images (see `open_samples`);
    reference: a RefStats, a DataConfig, or a path accepted by `open_reference`. The result names the feature space
    (extractor and fingerprint) and the sample and reference counts; JSON-able. per_sample: "per_sample" also holds,
    as lists in the samples' order, each image's part of the figures that are means over images: precision (1.0
    inside the reference manifold) and, for labelled samples, its `class_scores`. workers: processes decoding a
    reference data set.
    """
    source = samples if isinstance(samples, ImageSource) else open_samples(samples)
    ref = reference if isinstance(reference, RefStats) else open_reference(reference, extractor, batch_size, k, workers)
    feats_ND, probs_NY = extract(extractor, source, batch_size)
    mu, sigma = feature_stats(feats_ND)
    is_mean, is_std = inception_score(probs_NY, splits)
    out = {
        "feature_space": extractor.feature_space,
        "samples": source.name,
        "num_samples": len(source),
        "reference": ref.source,
        "num_reference": ref.count,
        "fid": frechet_distance(mu, sigma, ref.mu, ref.sigma),
        "inception_score": is_mean,
        "inception_score_std": is_std,
        "is_splits": splits,
    }
    if ref.feature_space is None:
        out["reference_feature_space"] = "unverified: the statistics file names no feature extractor"
    scores: dict[str, np.ndarray] = {}  # each image's share of the figures that are means over images
    if ref.feats is not None:
        radii_N = ref.radii if ref.k == k else knn_radii(ref.feats, k)
        out.update(precision_recall(ref.feats, feats_ND, k, radii_N), pr_k=k)
        scores["precision"] = in_manifold(feats_ND, ref.feats, radii_N).astype(np.float64)
    if source.labels is not None and extractor.class_names is not None:
        out.update(class_accuracy(probs_NY, source.labels, extractor.class_names))
        scores.update(class_scores(probs_NY, source.labels, len(extractor.class_names)))
    if per_sample:
        out["per_sample"] = {name: values_N.tolist() for name, values_N in scores.items()}
    return out

"""Generated samples scored against a reference in a named feature space."""

from __future__ import annotations

from elmgen.evaluation.features import extract
from elmgen.evaluation.metrics import (
    class_accuracy,
    class_scores,
    feature_stats,
    frechet_distance,
    inception_score,
    precision_recall,
)
from elmgen.evaluation.reference import RefStats, open_reference
from elmgen.evaluation.sources import ImageSource, open_samples


def evaluate_samples(
    samples, reference, extractor, k: int = 3, splits: int = 10, batch_size: int = 250, per_sample: bool = False
) -> dict:
    """FID, Inception Score, precision/recall and (for labelled samples and the classifier) class accuracy.

    samples: an ImageSource, or .npz shard paths / a folder of shards / a folder of images (see `open_samples`);
    reference: a RefStats, a DataConfig, or a path accepted by `open_reference`. The result names the feature space
    (extractor and fingerprint) and the sample and reference counts; JSON-able. per_sample: for labelled samples,
    "per_sample" also holds each image's scores (`class_scores`) as lists in the samples' order.
    """
    source = samples if isinstance(samples, ImageSource) else open_samples(samples)
    ref = reference if isinstance(reference, RefStats) else open_reference(reference, extractor, batch_size, k)
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
    if ref.feats is not None:
        out.update(precision_recall(ref.feats, feats_ND, k, ref.radii if ref.k == k else None), pr_k=k)
    if source.labels is not None and extractor.class_names is not None:
        out.update(class_accuracy(probs_NY, source.labels, extractor.class_names))
        if per_sample:
            scores = class_scores(probs_NY, source.labels, len(extractor.class_names))
            out["per_sample"] = {name: values_N.tolist() for name, values_N in scores.items()}
    return out

"""Measuring: pure metric functions, the images to measure, feature extractors, reference statistics, and
the reports built from them (tokenizers, samples)."""

from elmgen.evaluation.features import (
    INCEPTION_WEIGHTS_ENV,
    INCEPTION_WEIGHTS_FILE,
    ClassifierFeatures,
    InceptionFeatures,
    extract,
    load_extractor,
)
from elmgen.evaluation.metrics import (
    bit_stats,
    class_accuracy,
    class_scores,
    code_usage,
    feature_stats,
    frechet_distance,
    in_manifold,
    inception_score,
    knn_radii,
    precision_recall,
    psnr,
    ssim,
    subcode_usage,
)
from elmgen.evaluation.reference import (
    RefStats,
    check_stats,
    is_stats_file,
    load_ref_stats,
    open_reference,
    reference_stats,
    save_ref_stats,
)
from elmgen.evaluation.samples import evaluate_samples
from elmgen.evaluation.sources import DatasetImages, FolderImages, ImageSource, NpzImages, conform, open_samples
from elmgen.evaluation.tokenizer import (
    Reconstructions,
    evaluate_tokenizer,
    reconstruct,
    save_reconstructions,
    tokenizer_report,
)

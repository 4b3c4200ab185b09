"""Feature extractors: the project's classifier (offline) or the FID Inception-v3 from a local weights file;
each names its feature space, since features of different extractors are not comparable."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from elmgen.errors import ElmgenError
from elmgen.evaluation.sources import ImageSource
from elmgen.io import file_hash
from elmgen.models.classifier import load_classifier

INCEPTION_WEIGHTS_ENV = "ELMGEN_INCEPTION_WEIGHTS"


INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"


ADM_IMAGE_SIZE = 256  # ImageNet protocol: every image is ADM-centre-cropped to 256 before the network


class ClassifierFeatures:
    """The project's classifier: penultimate features and class probabilities (offline)."""

    def __init__(self, path, device="cpu"):
        self.model, meta = load_classifier(path, device)
        self.image_size, self.channels = meta["image_size"], meta["channels"]
        self.class_names = meta["class_names"]
        self.feature_space = {
            "name": "elmgen-classifier",
            "fingerprint": meta["fingerprint"],
            "path": meta["path"],
            "dataset": meta["dataset"],
            "image_size": self.image_size,
            "channels": self.channels,
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
            raise ElmgenError(
                f"the Inception backend needs torch-fidelity ({e}); install it with: pip install 'elmgen[inception]'"
            ) from None
        try:
            # Read once as plain tensors first: a file that needs more is refused here, whatever the
            # torch version lets the library's own load do.
            torch.load(weights, map_location="cpu", weights_only=True)
            self.net = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(weights)
            ).to(device)
        except (RuntimeError, OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as e:
            raise ElmgenError(f"{weights} does not hold the FID Inception weights: {str(e).splitlines()[0]}") from None
        self.device = device
        self.feature_space = {
            "name": "inception-v3-fid (torch-fidelity)",
            "fingerprint": file_hash(weights),
            "path": str(Path(weights).resolve()),
            "image_size": self.image_size,
            "channels": 3,
            "feature_dim": 2048,
        }

    @torch.no_grad()
    def __call__(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats_BD, logits_BY = self.net(images_BCHW.to(self.device))
        return feats_BD, logits_BY.softmax(-1)


def load_extractor(backend: str = "classifier", classifier=None, inception_weights=None, device="cpu"):
    """'classifier' (a run of `elmgen train-classifier`) or 'inception' (a local FID Inception weights file)."""
    if backend == "classifier":
        if classifier is None:
            raise ElmgenError(
                "the classifier backend needs --classifier RUN (train one with "
                "'elmgen train-classifier'), or choose --backend inception"
            )
        return ClassifierFeatures(classifier, device)
    if backend == "inception":
        return InceptionFeatures(inception_weights, device)
    raise ElmgenError(f"unknown feature backend {backend!r}; use 'classifier' or 'inception'")


def extract(extractor, source: ImageSource, batch_size: int = 250) -> tuple[np.ndarray, np.ndarray]:
    """Features (N, D) and class probabilities (N, Y) of every image of `source`, as float32."""
    feats, probs = [], []
    batches = source.batches(batch_size, extractor.image_size, extractor.channels)
    for batch in tqdm(batches, total=-(-len(source) // batch_size), desc="features", unit="batch"):
        f_BD, p_BY = extractor(torch.from_numpy(batch))
        feats.append(f_BD.float().cpu().numpy())
        probs.append(p_BY.float().cpu().numpy())
    return np.concatenate(feats), np.concatenate(probs)

"""A small CNN classifier: the offline feature space for FID / IS / precision-recall, and the judge of class accuracy.

No Inception weights can be downloaded here, so the project trains its own extractor: the activations before the
last layer play the role of Inception's pool3 features, its softmax that of the Inception
class probabilities. Every number measured with it names the checkpoint's fingerprint (data set, resolution,
channels, weights hash), because a different extractor gives different numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from elmgen import checkpoint
from elmgen.config import from_dict
from elmgen.data import to_float
from elmgen.errors import ElmgenError


@dataclass
class ClassifierConfig:
    widths: list[int] = field(default_factory=lambda: [32, 64, 128])  # channels per stage; later ones halve the side
    convs_per_stage: int = 1  # 3x3 conv + BatchNorm + ReLU blocks per stage
    pool_grid: int = 4  # the last feature map is average-pooled to pool_grid x pool_grid
    feature_dim: int = 128  # width of the penultimate layer: the feature space of FID and precision/recall
    dropout: float = 0.2  # before the class layer
    in_channels: int = 1  # set from data.channels
    num_classes: int = 10  # set from the data set


class Classifier(nn.Module):
    """Conv stages (strided downsampling) -> average pool to a small grid -> linear + ReLU (the features)
    -> dropout -> class logits."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        layers, c_in = [], cfg.in_channels
        for i, width in enumerate(cfg.widths):
            for j in range(cfg.convs_per_stage):
                # strided convs downsample: max-pooling is costly on CPUs (docs/performance.md)
                stride = 2 if i > 0 and j == 0 else 1
                layers += [
                    nn.Conv2d(c_in, width, 3, stride, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
                c_in = width
        # a small fixed grid instead of a global pool keeps where things are (a shirt from a coat), at any image size
        layers.append(nn.AdaptiveAvgPool2d(cfg.pool_grid))
        self.trunk = nn.Sequential(*layers)
        self.embed = nn.Sequential(
            nn.Flatten(), nn.Linear(c_in * cfg.pool_grid**2, cfg.feature_dim), nn.ReLU(inplace=True)
        )
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(cfg.feature_dim, cfg.num_classes))

    def forward_features(self, x_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images in [-1, 1] -> (penultimate features (B, D), class logits (B, Y))."""
        feats_BD = self.embed(self.trunk(x_BCHW))
        return feats_BD, self.head(feats_BD)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x_BCHW)[1]

    @torch.no_grad()
    def features_and_probs(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images (the data sets' format) -> float32 features (B, D) and class probabilities (B, Y)."""
        self.eval()
        x = to_float(images_BCHW.to(next(self.parameters()).device))
        feats_BD, logits_BY = self.forward_features(x)
        return feats_BD.float(), logits_BY.float().softmax(-1)

    def features(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.features_and_probs(images_BCHW)[0]

    def probs(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.features_and_probs(images_BCHW)[1]


def load_classifier(path: str | Path, device="cpu") -> tuple[Classifier, dict]:
    """A trained classifier and its checkpoint config, with `fingerprint` (weights hash) and `path` added."""
    meta = checkpoint.load_config(path)
    if meta.get("kind") != "classifier":
        raise ElmgenError(
            f"{path} is not a classifier checkpoint (kind {meta.get('kind')!r}); "
            "train one with 'elmgen train-classifier'"
        )
    model = Classifier(from_dict(ClassifierConfig, meta["classifier"]))
    checkpoint.load_weights(path, model)
    meta["fingerprint"] = checkpoint.fingerprint(path)
    meta["path"] = str(checkpoint.resolve(path).parent.parent.resolve())
    return model.to(device).eval(), meta

"""A small CNN classifier: the offline feature space for FID / IS / precision-recall, and the judge of class accuracy.

No Inception weights can be downloaded here, so the project trains its own extractor: the activations before the
last layer play the role of Inception's pool3 features, its softmax that of the Inception
class probabilities. Every number measured with it names the checkpoint's fingerprint (data set, resolution,
channels, weights hash), because a different extractor gives different numbers.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from elmgen import checkpoint
from elmgen.config import from_dict, to_dict
from elmgen.data import DataConfig, ImageDataset, absolute_source, load_dataset, to_float
from elmgen.errors import ElmgenError
from elmgen.evaluation import class_accuracy
from elmgen.training import TrainConfig, fit, is_main_process, resolve_device


@dataclass
class ClassifierConfig:
    widths: list[int] = field(default_factory=lambda: [32, 64, 128])  # channels per stage; later ones halve the side
    convs_per_stage: int = 1  # 3x3 conv + BatchNorm + ReLU blocks per stage
    pool_grid: int = 4  # the last feature map is average-pooled to pool_grid x pool_grid
    feature_dim: int = 128  # width of the penultimate layer: the feature space of FID and precision/recall
    dropout: float = 0.2  # before the class layer
    in_channels: int = 1  # set from data.channels
    num_classes: int = 10  # set from the data set


@dataclass
class ClassifierJob:
    data: DataConfig = field(default_factory=DataConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=1500, batch_size=128, lr=3e-3, warmup_steps=100, lr_decay="cosine", weight_decay=0.05,
        precision="auto", save_every=500))
    shift: int = 0  # random translations of up to this many pixels (the short default schedule learns faster without)
    hflip: bool = True  # random horizontal flips
    label_smoothing: float = 0.1


class Classifier(nn.Module):
    """Conv stages (strided downsampling) -> average pool to a small grid -> linear + ReLU (the features)
    -> dropout -> class logits."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        layers, c_in = [], cfg.in_channels
        for i, width in enumerate(cfg.widths):
            for j in range(cfg.convs_per_stage):
                # strided convs downsample: on CPU, max-pooling costs as much time as the convs themselves
                stride = 2 if i > 0 and j == 0 else 1
                layers += [nn.Conv2d(c_in, width, 3, stride, padding=1, bias=False), nn.BatchNorm2d(width),
                           nn.ReLU(inplace=True)]
                c_in = width
        # a small fixed grid instead of a global pool keeps where things are (a shirt from a coat), at any image size
        layers.append(nn.AdaptiveAvgPool2d(cfg.pool_grid))
        self.trunk = nn.Sequential(*layers)
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(c_in * cfg.pool_grid**2, cfg.feature_dim),
                                   nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(cfg.feature_dim, cfg.num_classes))

    def forward_features(self, x_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images in [-1, 1] -> (penultimate features (B, D), class logits (B, C))."""
        feats_BD = self.embed(self.trunk(x_BCHW))
        return feats_BD, self.head(feats_BD)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x_BCHW)[1]

    @torch.no_grad()
    def features_and_probs(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images (the data sets' format) -> float32 features (B, D) and class probabilities (B, C)."""
        self.eval()
        x = to_float(images_BCHW.to(next(self.parameters()).device))
        feats_BD, logits_BC = self.forward_features(x)
        return feats_BD.float(), logits_BC.float().softmax(-1)

    def features(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.features_and_probs(images_BCHW)[0]

    def probs(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.features_and_probs(images_BCHW)[1]


def augment(x_BCHW: torch.Tensor, shift: int, hflip: bool) -> torch.Tensor:
    """Random translations (edge pixels repeated) and horizontal flips, drawn from torch's global RNG
    (which the trainer seeds and checkpoints, so a resumed run sees the same batches)."""
    B, _, H, W = x_BCHW.shape
    if shift > 0:
        padded = F.pad(x_BCHW, (shift,) * 4, mode="replicate")
        dy, dx = torch.randint(0, 2 * shift + 1, (2, B)).tolist()
        x_BCHW = torch.stack([padded[i, :, dy[i]:dy[i] + H, dx[i]:dx[i] + W] for i in range(B)])
    if hflip:
        flip = torch.rand(B, device=x_BCHW.device) < 0.5
        x_BCHW = torch.where(flip[:, None, None, None], x_BCHW.flip(-1), x_BCHW)
    return x_BCHW


@torch.no_grad()
def evaluate_classifier(model: Classifier, dataset: ImageDataset, batch_size: int = 500) -> dict:
    """Accuracy and per-class accuracy (keyed by class name) on `dataset`."""
    probs_NC = np.concatenate([
        model.probs(dataset.images(np.arange(s, min(len(dataset), s + batch_size)))).cpu().numpy()
        for s in range(0, len(dataset), batch_size)
    ])
    acc = class_accuracy(probs_NC, dataset.labels, dataset.class_names)
    return {"images": len(dataset), "accuracy": acc["class_accuracy"], "per_class_accuracy": acc["per_class_accuracy"]}


def train_classifier(job: ClassifierJob, out_dir: str | Path, resume: bool = False) -> dict:
    """Train the classifier on job.data, then measure it on the test split; writes checkpoints,
    metrics.jsonl, job.yaml and eval.json (accuracy, per-class accuracy, training time, fingerprint)."""
    out_dir = Path(out_dir)
    dataset = load_dataset(job.data)
    job.classifier.in_channels = job.data.channels
    job.classifier.num_classes = dataset.num_classes
    if dataset.num_classes < 2:
        raise ElmgenError(f"{dataset.name} has {dataset.num_classes} class; a classifier needs at least 2")
    device = resolve_device(job.train.device)
    model = Classifier(job.classifier).to(device)
    ckpt_config = {
        "kind": "classifier", "classifier": to_dict(job.classifier), "data": to_dict(absolute_source(job.data)),
        "dataset": dataset.name, "image_size": job.data.image_size, "channels": job.data.channels,
        "class_names": dataset.class_names,
    }

    def step_fn(model, step, idx):
        x = augment(to_float(dataset.images(idx)).to(device), job.shift, job.hflip)
        y = torch.from_numpy(dataset.labels[idx]).to(device)
        logits = model(x).float()
        acc = (logits.argmax(-1) == y).float().mean().item()
        return F.cross_entropy(logits, y, label_smoothing=job.label_smoothing), {"train_acc": acc}

    t0, cpu0 = time.perf_counter(), time.process_time()
    fit(model, job.train, out_dir, step_fn, len(dataset), ckpt_config, resume, desc="classifier",
        units_per_step=job.train.batch_size, unit="img", job=job)
    # CPU seconds too: on a shared machine wall time says more about the neighbours than about the model
    train_seconds, train_cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    if not is_main_process():
        return {}
    test = load_dataset(replace(job.data, split="test", limit=None))
    report = {
        "dataset": test.name, **evaluate_classifier(model, test),
        "train_seconds": round(train_seconds, 1), "train_cpu_seconds": round(train_cpu_seconds, 1),
        "threads": torch.get_num_threads(), "steps": job.train.steps,
        "fingerprint": checkpoint.fingerprint(out_dir),
    }
    checkpoint.atomic_write_text(out_dir / "eval.json", json.dumps(report, indent=2))
    return report


def load_classifier(path: str | Path, device="cpu") -> tuple[Classifier, dict]:
    """A trained classifier and its checkpoint config, with `fingerprint` (weights hash) and `path` added."""
    meta = checkpoint.load_config(path)
    if meta.get("kind") != "classifier":
        raise ElmgenError(f"{path} is not a classifier checkpoint (kind {meta.get('kind')!r}); "
                          "train one with 'elmgen train-classifier'")
    model = Classifier(from_dict(ClassifierConfig, meta["classifier"]))
    checkpoint.load_weights(path, model)
    meta["fingerprint"] = checkpoint.fingerprint(path)
    meta["path"] = str(checkpoint.resolve(path).parent.parent.resolve())
    return model.to(device).eval(), meta

"""The classifier trainer: cross-entropy with label smoothing and light augmentation, then test accuracy."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from elmgen import checkpoint
from elmgen.checkpoint import CheckpointMeta
from elmgen.config import to_dict
from elmgen.data import (
    DataConfig,
    ImageDataset,
    absolute_source,
    load_dataset,
    random_blur,
    random_hflip,
    random_shift,
    to_float,
)
from elmgen.data.loader import item_uniforms
from elmgen.device import resolve_device
from elmgen.errors import ElmgenError
from elmgen.evaluation.metrics import class_accuracy
from elmgen.io import atomic_write_text
from elmgen.models.classifier import Classifier, ClassifierConfig
from elmgen.train.config import TrainConfig
from elmgen.train.distributed import is_main_process
from elmgen.train.loop import fit


@dataclass
class ClassifierJob:
    data: DataConfig = field(default_factory=DataConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=1500,
            batch_size=128,
            lr=3e-3,
            warmup_steps=100,
            lr_decay="cosine",
            weight_decay=0.05,
            precision="auto",
            save_every=500,
        )
    )
    shift: int = 0  # random translations of up to this many pixels (the short default schedule learns faster without)
    hflip: bool = True  # random horizontal flips
    blur: float = 0.0  # random Gaussian blur, sigma up to this (px): a judge of shapes, not of sub-pixel sharpness
    label_smoothing: float = 0.1  # of the cross-entropy

    def validate(self) -> None:
        if self.shift < 0 or not self.blur >= 0:
            raise ElmgenError(f"shift={self.shift}, blur={self.blur}: both must be >= 0 (0 turns each off)")


@torch.no_grad()
def evaluate_classifier(model: Classifier, dataset: ImageDataset, batch_size: int = 500) -> dict:
    """Accuracy and per-class accuracy (keyed by class name) on `dataset`."""
    probs_NY = np.concatenate(
        [
            model.probs(dataset.images(np.arange(s, min(len(dataset), s + batch_size)))).cpu().numpy()
            for s in range(0, len(dataset), batch_size)
        ]
    )
    acc = class_accuracy(probs_NY, dataset.labels, dataset.class_names)
    return {"images": len(dataset), "accuracy": acc["class_accuracy"], "per_class_accuracy": acc["per_class_accuracy"]}


def training_batch(
    dataset: ImageDataset, shift: int, hflip: bool, blur: float, seed: int, step: int, idx: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """The uint8 images (shifted, flipped and blurred at random, as configured) and labels of one micro-batch,
    made in the input pipeline's workers."""
    x, u_B4 = dataset.images(idx), item_uniforms(seed, step, idx, 4)
    if shift > 0:
        x = random_shift(x, shift, u_B4[:, 1:3])
    if hflip:
        x = random_hflip(x, u_B4[:, 0])
    if blur > 0:
        x = random_blur(x, blur, u_B4[:, 3])
    return x, torch.from_numpy(dataset.labels[idx])


def train_classifier(job: ClassifierJob, out_dir: str | Path, resume: bool = False) -> dict:
    """Train the classifier on job.data, then measure it on the test split; writes checkpoints,
    metrics.jsonl, job.yaml and eval.json (accuracy, per-class accuracy, training time, fingerprint)."""
    out_dir = Path(out_dir)
    job.validate()
    dataset = load_dataset(job.data)
    job.classifier.in_channels = job.data.channels
    job.classifier.num_classes = dataset.num_classes
    if dataset.num_classes < 2:
        raise ElmgenError(f"{dataset.name} has {dataset.num_classes} class; a classifier needs at least 2")
    device = resolve_device(job.train.device)
    model = Classifier(job.classifier).to(device)
    meta = CheckpointMeta(
        kind="classifier",
        classifier=to_dict(job.classifier),
        data=to_dict(absolute_source(job.data)),
        dataset=dataset.name,
        image_size=job.data.image_size,
        channels=job.data.channels,
        class_names=dataset.class_names,
    )

    def step_fn(model, step, batch):
        x, y = (t.to(device, non_blocking=True) for t in batch)
        x = to_float(x)
        logits = model(x).float()
        acc = (logits.argmax(-1) == y).float().mean().item()
        return F.cross_entropy(logits, y, label_smoothing=job.label_smoothing), {"train_acc": acc}

    t0, cpu0 = time.perf_counter(), time.process_time()
    fit(
        model,
        job.train,
        out_dir,
        step_fn,
        len(dataset),
        meta,
        resume,
        desc="classifier",
        units_per_step=job.train.batch_size,
        unit="img",
        job=job,
        load=partial(training_batch, dataset, job.shift, job.hflip, job.blur, job.train.seed),
        in_memory=dataset.in_memory,
    )
    # CPU seconds too: on a shared machine wall time says more about the neighbours than about the model
    train_seconds, train_cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    if not is_main_process():
        return {}
    return test_report(model, job, out_dir, train_seconds, train_cpu_seconds)


def test_report(model: Classifier, job: ClassifierJob, out_dir: Path, seconds: float, cpu_seconds: float) -> dict:
    """eval.json: accuracy on the test split, the training time and the weights' fingerprint."""
    test = load_dataset(replace(job.data, split="test", limit=None))
    report = {
        "dataset": test.name,
        **evaluate_classifier(model, test),
        "train_seconds": round(seconds, 1),
        "train_cpu_seconds": round(cpu_seconds, 1),
        "threads": torch.get_num_threads(),
        "steps": job.train.steps,
        "fingerprint": checkpoint.fingerprint(out_dir),
    }
    atomic_write_text(out_dir / "eval.json", json.dumps(report, indent=2))
    return report

"""The classifier that defines the offline feature space: it learns, it round-trips, it names itself."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from elmgen import checkpoint
from elmgen.checkpoint import CheckpointMeta
from elmgen.config import build_config
from elmgen.data import DataConfig, load_dataset
from elmgen.errors import ElmgenError
from elmgen.models import load_classifier
from elmgen.train import ClassifierJob, train_classifier

# small enough to train in seconds on the fake data, large enough to separate its ten square sizes
FAST = [
    "classifier.widths=[8,16,32]",
    "classifier.feature_dim=32",
    "train.steps=60",
    "train.batch_size=32",
    "train.lr=5e-3",
    "train.warmup_steps=5",
    "train.log_every=20",
    "train.save_every=60",
    "shift=0",
    "hflip=false",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def train_fast(out, *overrides):
    job = build_config(ClassifierJob, None, [*FAST, *overrides])
    return train_classifier(job, out)


def test_learns_fake_fashion_mnist(fake_fmnist, tmp_path):
    report = train_fast(tmp_path / "clf")
    assert report["dataset"] == "fashion-mnist/test" and report["images"] == 50
    assert report["accuracy"] >= 0.9, report
    assert set(report["per_class_accuracy"]) == set(load_dataset(DataConfig(split="test")).class_names)
    saved = json.loads((tmp_path / "clf" / "eval.json").read_text())
    assert saved["accuracy"] == report["accuracy"] and saved["train_seconds"] > 0


def test_load_features_probs_and_fingerprint(fake_fmnist, tmp_path):
    report = train_fast(tmp_path / "clf", "train.steps=4", "train.save_every=4")
    model, meta = load_classifier(tmp_path / "clf")
    assert meta["fingerprint"] == report["fingerprint"] == checkpoint.fingerprint(tmp_path / "clf")
    assert (meta["dataset"], meta["image_size"], meta["channels"]) == ("fashion-mnist/train", 32, 1)
    images = load_dataset(DataConfig(split="test", limit=6)).images(np.arange(6))
    feats, probs = model.features(images), model.probs(images)
    assert feats.shape == (6, 32) and probs.shape == (6, 10)
    assert torch.allclose(probs.sum(-1), torch.ones(6), atol=1e-5)
    assert torch.equal(model.features(images), feats)  # eval mode: dropout and batch statistics are off


def test_rgb_folder_at_another_size(image_folder, tmp_path):
    report = train_fast(
        tmp_path / "clf",
        f"data.source={image_folder}",
        "data.channels=3",
        "data.image_size=24",
        "train.steps=4",
        "train.batch_size=6",
        "train.save_every=4",
    )
    model, meta = load_classifier(tmp_path / "clf")
    assert (meta["channels"], meta["image_size"], len(meta["class_names"])) == (3, 24, 3)
    assert report["images"] == 3  # held out: one image of each class (the folder has no test/)
    images = load_dataset(DataConfig(source=str(image_folder), channels=3, image_size=24)).images([0, 1])
    assert model.probs(images).shape == (2, 3)


def test_other_checkpoint_is_refused(tmp_path):
    checkpoint.save_checkpoint(tmp_path / "bae", 1, nn.Linear(2, 2), CheckpointMeta(kind="bae"))
    with pytest.raises(ElmgenError, match="not a classifier checkpoint"):
        load_classifier(tmp_path / "bae")

"""The ceiling a tokenizer sets on samples: its reconstructions of the held-out images, scored as samples are.

    python scripts/reconstruction_ceiling.py RUN/tokenizer RUN/classifier [--reference STATS.npz]

Encodes and decodes every held-out image of the tokenizer's data set (the same split the pipeline holds out)
and prints class accuracy, precision, recall and FID in the classifier's feature space, against the reference
statistics the pipeline saved (or the classifier's training images). A language model on this tokenizer's
codes cannot look better to that classifier than these reconstructions do.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from elmgen.data import DataConfig, load_dataset, to_float, to_uint8
from elmgen.evaluation import evaluate_samples, load_extractor
from elmgen.tokenizers import load_tokenizer


@torch.no_grad()
def reconstruct(tokenizer, dataset, batch_size: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Reconstructions (uint8 NHWC, ADM layout) of every image of `dataset`, with its labels."""
    images = []
    for start in range(0, len(dataset), batch_size):
        x = to_float(dataset.images(list(range(start, min(start + batch_size, len(dataset))))))
        recon = tokenizer.decode_cells(tokenizer.encode_cells(x), x.shape[-1] // tokenizer.cfg.downsample)
        images.append(to_uint8(recon.clamp(-1, 1)).permute(0, 2, 3, 1).numpy())
    return np.concatenate(images), np.asarray(dataset.labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tokenizer", help="a tokenizer run folder (or one of its checkpoints)")
    parser.add_argument("classifier", help="the classifier run folder that judges samples")
    parser.add_argument("--reference", help="reference statistics (.npz); default: the classifier's training images")
    a = parser.parse_args()
    tokenizer, meta = load_tokenizer(a.tokenizer)
    data = DataConfig(**{k: v for k, v in meta["data"].items() if k in DataConfig.__dataclass_fields__})
    held_out = load_dataset(replace(data, split="test", limit=None))
    images, labels = reconstruct(tokenizer, held_out)
    extractor = load_extractor("classifier", classifier=a.classifier)
    reference = a.reference or replace(data, split="train")
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "reconstructions.npz", images, labels)
        result = evaluate_samples(Path(tmp) / "reconstructions.npz", reference, extractor, splits=10)
    keys = ("class_accuracy", "precision", "recall", "fid", "num_samples")
    print(json.dumps({"held_out": held_out.name, **{k: result[k] for k in keys}}, indent=2))


if __name__ == "__main__":
    main()

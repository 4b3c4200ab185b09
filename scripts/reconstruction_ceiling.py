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
import sys
from dataclasses import replace

from elmgen.data import DataConfig, load_dataset
from elmgen.errors import ElmgenError
from elmgen.evaluation import Reconstructions, evaluate_samples, load_extractor
from elmgen.tokenizers import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tokenizer", help="a tokenizer run folder (or one of its checkpoints)")
    parser.add_argument("classifier", help="the classifier run folder that judges samples")
    parser.add_argument("--reference", help="reference statistics (.npz); default: the classifier's training images")
    a = parser.parse_args()
    tokenizer, meta = load_tokenizer(a.tokenizer)
    data = DataConfig(**{k: v for k, v in meta["data"].items() if k in DataConfig.__dataclass_fields__})
    held_out = load_dataset(replace(data, split="test", limit=None))
    extractor = load_extractor("classifier", classifier=a.classifier)
    reference = a.reference or replace(data, split="train")
    result = evaluate_samples(Reconstructions(tokenizer, held_out), reference, extractor, splits=10)
    keys = ("class_accuracy", "precision", "recall", "fid", "num_samples")
    print(json.dumps({"held_out": held_out.name, **{k: result[k] for k in keys}}, indent=2))


if __name__ == "__main__":
    try:
        main()
    except ElmgenError as e:  # a wrong path or a mismatched run: one line, as elmgen's own commands say it
        print(f"reconstruction_ceiling.py: error: {e}", file=sys.stderr)
        sys.exit(2)

"""The input pipeline: images/s of tokenizer training and of `elmgen tokenize` on a folder of 64x64 JPEGs with
0, 1 and 2 DataLoader workers, and `tokenize` in 1 and 2 processes (torchrun, gloo).

    python benchmarks/input_pipeline.py [--images 1200] [--workers 0 1 2] [--train-steps 24] [--repeats 1]

Writes the folder first (4 classes of random-colour JPEGs at 80x80, read at 64 px: every image is decoded,
resized and cropped), and one 1-step tokenizer of `configs/tokenizer-folder-rgb64.yaml` to encode with (the
cost does not depend on the weights). Every case is a fresh `elmgen` command, one after the other:
- train-tokenizer: the training images/s of metrics.jsonl (the median over its rows, the first one left out:
  it pays for start-up), at batch 32, the GAN off;
- tokenize: images encoded per second of the command's wall clock (start-up included: what a user waits for);
  with `--processes 2` under torchrun, each process with one thread and `--workers 0` (the cores are the
  processes'), against one process with both threads.
Each case runs `--repeats` times (the median counts). Prints one JSON line per case; run it on an otherwise idle
machine.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import environment, parser, rounded
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "tokenizer-folder-rgb64.yaml"
ELMGEN = [sys.executable, "-m", "elmgen.cli"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "elmgen.cli"]


def write_folder(root: Path, images: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(images):
        folder = root / f"class_{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def timed(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def train_case(folder: Path, out: Path, workers: int, steps: int, threads: int) -> dict:
    keys = [f"train.steps={steps}", "train.log_every=2", f"train.save_every={steps}", "loss.gan=false"]
    cmd = [*ELMGEN, "train-tokenizer", "--config", str(CONFIG), "--data", str(folder), "--out", str(out)]
    seconds = timed([*cmd, "--workers", str(workers), *keys], threads)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["img_per_s"] for r in rows if "img_per_s" in r][1:]
    return {"images_per_s": statistics.median(rates), "command_seconds": seconds}


def tokenize_case(folder: Path, tokenizer: Path, out: Path, workers: int, processes: int, threads: int) -> dict:
    launch = TORCHRUN if processes > 1 else ELMGEN
    cmd = [*launch, "tokenize", "--tokenizer", str(tokenizer), "--data", str(folder), "--out", str(out)]
    seconds = timed([*cmd, "--workers", str(workers), "--shard-size", "256"], threads)
    images = json.loads((out / "meta.json").read_text())["images"]
    return {"images_per_s": images / seconds, "command_seconds": seconds}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--images", type=int, default=1200, help="JPEGs in the folder (4 classes)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader workers per case")
    p.add_argument("--train-steps", type=int, default=24, help="tokenizer training steps a case")
    p.set_defaults(repeats=1)
    a = p.parse_args()
    head = environment(a.threads)
    scratch = Path(tempfile.mkdtemp(prefix="elmgen-input-"))
    try:
        folder = write_folder(scratch / "images", a.images)
        tokenizer = scratch / "tokenizer"
        keys = ["train.steps=1", "train.save_every=1", "loss.gan=false"]
        cmd = [*ELMGEN, "train-tokenizer", "--config", str(CONFIG), "--data", str(folder), "--out", str(tokenizer)]
        timed([*cmd, "--workers", "0", *keys], a.threads)
        cases = [("train-tokenizer", w, 1) for w in a.workers] + [("tokenize", w, 1) for w in a.workers]
        cases.append(("tokenize", 0, 2))
        for n, (stage, workers, processes) in enumerate(cases):
            threads, results = a.threads // processes, []
            for r in range(a.repeats):
                out = scratch / f"case{n}-{r}"
                if stage == "train-tokenizer":
                    results.append(train_case(folder, out, workers, a.train_steps, threads))
                else:
                    results.append(tokenize_case(folder, tokenizer, out, workers, processes, threads))
            result = {k: statistics.median(r[k] for r in results) for k in results[0]}
            case = {"bench": "input_pipeline", "stage": stage, "workers": workers, "processes": processes}
            print(json.dumps({**head, **case, "images": a.images, "repeats": a.repeats, **rounded(result)}), flush=True)
    finally:
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main()

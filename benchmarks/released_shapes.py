"""Everything downstream of `elmgen import` at the paper's released L shape, on this CPU (issue 14, part 6).

Official-layout files with random weights, as the releases name and shape their tensors (built by the
test suite's builders): ELM's BAE with K = 20 and K = 16 (256 px, base width 128, multipliers 1,1,2,2,4,
two ResBlocks a level, latent width 256, norm_first), the AR L-2-10 (24 layers, width 1024, 1000
classes) and the MLM L-1-16. Each is imported with `elmgen import elm`, then every command that reads a
model or a tokenizer runs on them in its own process, timed (wall clock) with its peak resident memory:

    python benchmarks/released_shapes.py --out /tmp/released     # about 6 minutes, 7 GB on disk

The files are random weights, so the images are noise: what is checked is that each command runs at the
real shapes and what it costs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the official-layout builders live with the tests that check them

from test_import import elm_ar_state, elm_mlm_state  # noqa: E402
from test_import_tokenizers import elm_state  # noqa: E402

L = dict(d=1024, layers=24, classes=1000)
BAE = dict(nf=128, mult=(1, 1, 2, 2, 4), blocks=2, emb=256, norm_first=True)


def timed(name: str, *argv: str) -> dict:
    """One elmgen command in a fresh process: its seconds and peak RSS (GNU time), or the error it printed."""
    cmd = ["/usr/bin/time", "-f", "%e %M", sys.executable, "-m", "elmgen.cli", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    last = proc.stderr.strip().splitlines()[-1].split()
    row = {"command": name, "argv": " ".join(argv), "exit": proc.returncode}
    if proc.returncode == 0:
        row.update(seconds=float(last[0]), peak_rss_gb=round(int(last[1]) / 2**20, 2))
    else:
        row["error"] = proc.stderr.strip().splitlines()[-2:]
    print(json.dumps(row), flush=True)
    return row


def write_files(files: Path) -> None:
    files.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for name, state in (
        ("bae20.th", lambda: elm_state(**BAE, bits=20)),
        ("bae16.th", lambda: elm_state(**BAE, bits=16)),
        ("L-2-10.pth", lambda: elm_ar_state(2, 10, **L)),
        ("mlmL-1-16.pth", lambda: elm_mlm_state(16, cells=256, **L)),
    ):
        if not (files / name).is_file():
            torch.save(state(), files / name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="work folder (files, runs, outputs)")
    args = p.parse_args()
    out, files = args.out, args.out / "files"
    write_files(files)
    images = out / "images"
    if not images.is_dir():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "elmgen.cli",
                "shapes",
                "--out",
                str(images),
                "--classes",
                "2",
                "--per-class",
                "4",
                "--size",
                "256",
            ],
            check=True,
            capture_output=True,
        )
    tok20, tok16, ar, mlm, codes = (str(out / n) for n in ("tok20", "tok16", "ar", "mlm", "codes"))
    sweep = out / "sweep.yaml"
    sweep.write_text(
        f"model: {{path: {ar}, classes: [1]}}\nbase: {{num_per_class: 1, evaluate: false}}\n"
        "grid: {sample.top_k: [0, 400]}\n"
    )
    r = str(out / "results")
    rows = [
        timed("import BAE-20", "import", "elm", str(files / "bae20.th"), "--out", tok20),
        timed("import BAE-16", "import", "elm", str(files / "bae16.th"), "--out", tok16),
        timed("import AR L-2-10", "import", "elm", str(files / "L-2-10.pth"), "--out", ar, "--tokenizer", tok20),
        timed("import MLM L-1-16", "import", "elm", str(files / "mlmL-1-16.pth"), "--out", mlm, "--tokenizer", tok16),
        timed("model-info AR", "model-info", ar, "--json"),
        timed("model-info MLM", "model-info", mlm, "--json"),
        timed(
            "sample AR, 2 images",
            "sample",
            "--model",
            ar,
            "--out",
            f"{r}/sample",
            "--classes",
            "1",
            "2",
            "--num-per-class",
            "1",
        ),
        timed(
            "sample MLM, 2 images, 8 steps",
            "sample",
            "--model",
            mlm,
            "--out",
            f"{r}/sample-mlm",
            "--classes",
            "1",
            "2",
            "--num-per-class",
            "1",
            "--steps",
            "8",
        ),
        timed(
            "outpaint AR, 16x24 cells",
            "outpaint",
            "--model",
            ar,
            "--out",
            f"{r}/outpaint",
            "--width",
            "24",
            "--classes",
            "1",
            "--num-per-class",
            "1",
        ),
        timed(
            "inpaint MLM, 8x8 cells",
            "inpaint",
            "--model",
            mlm,
            "--out",
            f"{r}/inpaint",
            "--data",
            str(images),
            "--split",
            "train",
            "--indices",
            "0",
            "--region",
            "4",
            "4",
            "8",
            "8",
        ),
        timed(
            "tokenize 8 images (BAE-20)",
            "tokenize",
            "--tokenizer",
            tok20,
            "--data",
            str(images),
            "--out",
            codes,
            "--vocab",
            "2-10",
        ),
        timed(
            "analyze attention AR (codes)",
            "analyze",
            "attention",
            "--model",
            ar,
            "--codes",
            codes,
            "--num-sequences",
            "2",
            "--out",
            f"{r}/attention-ar",
        ),
        timed(
            "analyze attention MLM (sampled)",
            "analyze",
            "attention",
            "--model",
            mlm,
            "--sampled",
            "--num-sequences",
            "2",
            "--out",
            f"{r}/attention-mlm",
        ),
        timed(
            "analyze randomness (BAE-20 codes)", "analyze", "randomness", "--codes", codes, "--out", f"{r}/randomness"
        ),
        timed("sweep AR top-k 0 / 400, 1 image each", "sweep", str(sweep), "--out", f"{r}/sweep"),
    ]
    print(f"\nthreads {os.cpu_count()}, torch {torch.__version__}\n")
    print("| command | exit | seconds | peak RSS (GB) |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['command']} | {row['exit']} | {row.get('seconds', '')} | {row.get('peak_rss_gb', '')} |")
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    sys.exit(0 if all(row["exit"] == 0 for row in rows) else 1)


if __name__ == "__main__":
    main()

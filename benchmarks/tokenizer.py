"""Tokenizer throughput: `Autoencoder.encode_cells` (images -> cell codes) and `decode_cells` (codes ->
images) in images/s, under torch.no_grad, in fp32 and under bf16 autocast.

    python benchmarks/tokenizer.py --configs demo configs/tokenizer-folder-rgb64.yaml --batch 64

`demo` is the demo's tokenizer (`elmgen.pipeline.PipelineConfig`: 32x32 grey images, widths 32-64-64,
one ResBlock a level, 16 bits on an 8x8 grid); any other name is a tokenizer YAML (an
`elmgen train-tokenizer --config` file), whose image size and channels come from its `data` section.
Random weights (the cost does not depend on them), random images, random codes. Each case runs in a
fresh process (peak memory: see benchmarks/common.py), warms up with one call, then times
`--repeats` calls. Prints one JSON line per (config, op, precision).
"""

from __future__ import annotations

import torch
from common import median_seconds, parser, rounded, run

from elmgen.config import build_config
from elmgen.device import autocast
from elmgen.pipeline import PipelineConfig
from elmgen.tokenizers import Autoencoder
from elmgen.train import TokenizerJob


def tokenizer_job(name: str) -> TokenizerJob:
    return PipelineConfig().tokenizer if name == "demo" else build_config(TokenizerJob, name)


@torch.no_grad()
def run_case(c: dict) -> dict:
    job = tokenizer_job(c["config"])
    job.tokenizer.in_channels = job.data.channels
    model = Autoencoder(job.tokenizer).eval()
    size, grid = job.data.image_size, job.data.image_size // job.tokenizer.downsample
    images = torch.rand(c["batch"], job.data.channels, size, size) * 2 - 1
    cells = torch.randint(0, model.num_codes, (c["batch"], grid * grid))

    def call():
        with autocast(torch.device("cpu"), c["precision"]):
            return model.encode_cells(images) if c["op"] == "encode" else model.decode_cells(cells, grid)

    first = median_seconds(call, 1)
    seconds = median_seconds(call, c["repeats"])
    return rounded(
        {
            "image_size": size,
            "channels": job.data.channels,
            "grid": grid,
            "bits": model.code_bits,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "first_call_seconds": first,
            "seconds": seconds,
            "images_per_s": c["batch"] / seconds,
        }
    )


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--configs", nargs="+", default=["demo"], help="'demo' or tokenizer YAML files")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    a = p.parse_args()
    cases = [
        {"bench": "tokenizer", "config": name, "op": op, "precision": precision, "batch": a.batch}
        for name in a.configs
        for op in ("encode", "decode")
        for precision in a.precision
    ]
    run(a, __file__, cases, run_case)


if __name__ == "__main__":
    main()

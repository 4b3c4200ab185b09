"""AR sampling throughput: KV-cached decoding against full-prefix recomputation.

Prints one JSON line. Same model (random weights, non-zero heads), batch, grid and sampling settings
for both paths; tokens = generated grid cells, counted per image (CFG doubles the work of both).

    python benchmarks/sampling.py --preset tiny --grid 16 --batch 32
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from elmgen.model import ModelConfig, Transformer, preset
from elmgen.sampling import SampleConfig, generate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--vocab", default="2-8")
    p.add_argument("--grid", type=int, default=16)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--cfg-scale", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**preset(a.preset), vocab=a.vocab, grid_size=a.grid, num_classes=10))
    torch.nn.init.normal_(model.head.weight, std=0.02)
    labels = torch.arange(a.batch) % 10
    seeds = list(range(a.batch))
    result = {"preset": a.preset, "vocab": a.vocab, "grid": a.grid, "batch": a.batch, "cfg_scale": a.cfg_scale,
              "threads": a.threads, "device": "cpu"}
    outputs = {}
    for name, kv in (("kv", True), ("recompute", False)):
        cfg = SampleConfig(cfg_scale=a.cfg_scale, kv_cache=kv)
        generate(model, labels[:2], cfg, seeds[:2])  # warm-up
        t = time.perf_counter()
        outputs[name] = generate(model, labels, cfg, seeds)
        seconds = time.perf_counter() - t
        result[f"{name}_seconds"] = round(seconds, 3)
        result[f"{name}_tokens_per_s"] = round(a.batch * a.grid**2 / seconds, 1)
    result["speedup"] = round(result["kv_tokens_per_s"] / result["recompute_tokens_per_s"], 2)
    result["same_tokens"] = bool(torch.equal(outputs["kv"], outputs["recompute"]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

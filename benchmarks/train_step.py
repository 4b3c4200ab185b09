"""Training-step throughput against this machine's own matmul limit.

Measures, in one run: the bf16 (and fp32) matmul throughput of a large square matmul (the practical
ceiling), then full AR training steps (forward, backward, AdamW) of each preset on random codes,
reporting tokens/s, achieved FLOP/s (model FLOPs from `flops_per_token`) and its share of the ceiling.
Prints one JSON line per preset.

    python benchmarks/train_step.py --presets tiny B --batch 16 --grid 16
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
import torch.nn.functional as F

from elmgen.model import ModelConfig, Transformer, flops_per_token, preset
from elmgen.training import TrainConfig, autocast, make_optimizer


def matmul_flops(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    count, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - t)


def step_throughput(name: str, vocab: str, grid: int, batch: int, steps: int, precision: str) -> dict:
    cfg = ModelConfig(**{**preset(name), "dropout": 0.0}, vocab=vocab, grid_size=grid, num_classes=10)
    model = Transformer(cfg)
    opt = make_optimizer(model, TrainConfig())
    sub = torch.randint(0, cfg.vocabulary.size, (batch, cfg.num_cells, cfg.vocabulary.num_subcodes))
    labels = torch.randint(0, 10, (batch,))

    def step():
        with autocast(torch.device("cpu"), precision):
            logits = model(labels, sub[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 2), sub.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - t) / steps
    tokens = batch * cfg.num_cells
    return {"tokens_per_s": tokens / seconds, "flops_per_s": flops_per_token(cfg)["train"] * tokens / seconds,
            "step_seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "B"])
    p.add_argument("--vocab", default="2-8")
    p.add_argument("--grid", type=int, default=16)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    a = p.parse_args()
    torch.manual_seed(0)
    ceiling = {"bf16": matmul_flops(torch.bfloat16), "fp32": matmul_flops(torch.float32)}
    for name in a.presets:
        r = step_throughput(name, a.vocab, a.grid, a.batch, a.steps, a.precision)
        print(json.dumps({
            "preset": name, "vocab": a.vocab, "grid": a.grid, "batch": a.batch, "precision": a.precision,
            "threads": torch.get_num_threads(), "tokens_per_s": round(r["tokens_per_s"], 1),
            "achieved_tflops": round(r["flops_per_s"] / 1e12, 4),
            "matmul_tflops_bf16": round(ceiling["bf16"] / 1e12, 4),
            "matmul_tflops_fp32": round(ceiling["fp32"] / 1e12, 4),
            "share_of_matmul_limit": round(r["flops_per_s"] / ceiling[a.precision], 3),
            "step_seconds": round(r["step_seconds"], 3),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        }), flush=True)


if __name__ == "__main__":
    main()

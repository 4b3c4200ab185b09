"""Sampling throughput: AR with a KV cache (eager and compiled) against full-prefix recomputation, and
MaskGIT decoding of a masked model.

    python benchmarks/sampling.py --preset tiny --grid 16 --batch 1 32 --mlm-steps 8 16

For each batch size, in this order: AR recomputing the whole prefix at every cell
(`kv_cache=False`), AR with the KV cache (fp32, then bf16: bfloat16 linear weights under autocast, a
bfloat16 cache, and on CPUs with native bf16 the weights reordered once, as `generate` does), AR with the
KV cache and `compile=True` (the one-cell decode step compiled, static shapes), then MLM
(`kind="mlm"`) at each number of MaskGIT steps. All cases use the same random weights (non-zero
heads), labels, per-image seeds and sampling settings (CFG doubles the work of every case). Each
case runs in a fresh process (peak memory: see benchmarks/common.py); it first warms up with one
call (at the full batch when compiled, as the compiled step is specialised to its shapes, else at
batch <= 2; `first_call_seconds`), then times `--repeats` calls.

Prints one JSON line per case: seconds per call, tokens/s (generated grid cells per image x images)
and images/s; KV rows add `speedup_vs_recompute` and `same_tokens_as_recompute` (sampled tokens equal to
those of the recomputing case of the same batch). KV-cached AR rows also carry the decode step's roofline
(max of weight bytes / memory bandwidth and FLOPs / matmul rate, both measured in the case's process just
before and after the timed calls, the better counts: `roofline_step_ms`), the measured time per step
and `share_of_roofline`.
"""

from __future__ import annotations

import hashlib

import torch
from common import (
    matmul_reference,
    median_seconds,
    memory_bandwidth,
    parser,
    roofline_seconds,
    rounded,
    run,
    timed_between_ceilings,
)

from elmgen.models import ModelConfig, Transformer, flops_per_token, preset
from elmgen.sampling import SampleConfig, generate


def run_case(c: dict) -> dict:
    cfg = ModelConfig(**preset(c["preset"]), kind=c["kind"], vocab=c["vocab"], grid_size=c["grid"], num_classes=10)
    model = Transformer(cfg)
    torch.nn.init.normal_(model.head.weight, std=0.02)  # a zero head (the init) samples uniformly
    if c.get("precision") == "bf16":  # as `elmgen sample --precision bf16`: no fp32 copy of the linear weights
        model.bf16_linears()
    sample = SampleConfig(
        guidance_scale=c["guidance_scale"],
        kv_cache=c.get("decode") != "recompute",
        compile=c.get("compile", False),
        steps=c.get("steps", 10),
        precision=c.get("precision", "fp32"),
    )
    labels, seeds = torch.arange(c["batch"]) % 10, list(range(c["batch"]))
    warm = c["batch"] if sample.compile else min(c["batch"], 2)
    first = median_seconds(lambda: generate(model, labels[:warm], sample, seeds[:warm]), 1)
    tokens = []

    def timed() -> float:
        return median_seconds(lambda: tokens.append(generate(model, labels, sample, seeds)), c["repeats"])

    roofline = c["kind"] == "ar" and c.get("decode") == "kv"  # only KV-cached AR rows carry one
    seconds, ceiling = timed_between_ceilings(machine_ceiling, timed) if roofline else (timed(), {})
    images = c["batch"] / seconds
    return rounded(
        {
            **(decode_roofline(cfg, c, seconds, ceiling) if roofline else {}),
            "first_call_seconds": first,
            "seconds": seconds,
            "tokens_per_s": images * cfg.num_cells,
            "images_per_s": images,
            "tokens_sha1": hashlib.sha1(tokens[-1].numpy().tobytes()).hexdigest()[:16],
        }
    )


def machine_ceiling() -> dict:
    """The two limits of a decode step on this machine: memory bandwidth and the matmul rates."""
    return {**memory_bandwidth(), **matmul_reference(seconds=1.0)}


def decode_roofline(cfg: ModelConfig, c: dict, seconds: float, ceiling: dict) -> dict:
    """The one-cell decode step's roofline on this machine (`ceiling`: measured in this process around the
    timed calls) and the share of it the measured calls reach (a call is one step per cell). A step reads
    every matmul weight once (2 bytes each in bf16: the ideal of a bfloat16 copy of the weights) and does the
    forward FLOPs of its rows (CFG doubles them)."""
    cost = flops_per_token(cfg)
    rows = c["batch"] * (2 if c["guidance_scale"] != 1 else 1)
    weight_bytes = cost["matmul"] / 2 * (2 if c["precision"] == "bf16" else 4)
    step = roofline_seconds(weight_bytes, cost["forward"] * rows, ceiling, c["precision"])
    return {
        **ceiling,
        "weight_mb": weight_bytes / 1e6,
        "roofline_step_ms": step * 1e3,
        "measured_step_ms": seconds / cfg.num_cells * 1e3,
        "share_of_roofline": step * cfg.num_cells / seconds,
    }


def compare(row: dict, earlier: list[dict]) -> None:
    if row.get("decode") == "kv":
        ref = next((r for r in earlier if r.get("decode") == "recompute" and r["batch"] == row["batch"]), None)
        if ref is None:  # --no-recompute
            return
        row["speedup_vs_recompute"] = round(row["tokens_per_s"] / ref["tokens_per_s"], 2)
        row["same_tokens_as_recompute"] = row["tokens_sha1"] == ref["tokens_sha1"]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--vocab", default="2-8")
    p.add_argument("--grid", type=int, default=16)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--mlm-steps", type=int, nargs="*", default=[8, 16], help="MaskGIT step counts (none: no MLM)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled AR case")
    p.add_argument("--no-recompute", action="store_true", help="skip the recomputing AR case (slow at L+)")
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], help="KV-cached AR cases to run")
    a = p.parse_args()
    cases = []
    for batch in a.batch:
        base = {
            "bench": "sampling",
            "preset": a.preset,
            "vocab": a.vocab,
            "grid": a.grid,
            "batch": batch,
            "guidance_scale": a.guidance_scale,
        }
        ar = [] if a.no_recompute else [("recompute", False, "fp32")]
        ar += [("kv", False, precision) for precision in a.precision]
        ar += [] if a.no_compile else [("kv", True, "fp32")]
        cases += [
            {**base, "kind": "ar", "decode": decode, "compile": compiled, "precision": precision}
            for decode, compiled, precision in ar
        ]
        cases += [{**base, "kind": "mlm", "steps": steps} for steps in a.mlm_steps]
    run(a, __file__, cases, run_case, compare=compare)


if __name__ == "__main__":
    main()

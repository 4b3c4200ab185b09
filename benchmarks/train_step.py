"""Training-step throughput against this machine's own matmul limit.

    python benchmarks/train_step.py --presets tiny B --kind ar mlm --batch 16 --grid 16
    python benchmarks/train_step.py --presets tiny B --kind ar mlm --batch 16 --grid 16 --compile
    python benchmarks/train_step.py --presets B --vocab 1-14 --profile 25   # the 25 costliest operators of a step

Measures, in each case's own process: the bf16 and fp32 throughput of a large square matmul (the
practical ceiling; before and after the timed steps, the better counts), and full training steps of
each preset and model kind on random codes: the loss of the trainer (`elmgen.train.ar_loss` /
`mlm_loss`, their cross-entropy in chunks of `--logits-chunk` logits) under autocast, backward,
gradient clipping and AdamW, as `elmgen.training.fit` does them. `--compile` compiles the model in place
as `--compile` training does (the first, compiling step is reported as `first_step_seconds`);
`--activation-checkpointing` recomputes each block in the backward pass. Two untimed steps come first: an
eager step's second call is still far slower than the steady state.

Prints one JSON line per (preset, kind, chunk): tokens/s (batch x grid cells per step), achieved FLOP/s (model
FLOPs from `elmgen.model.flops_per_token`) and their share of the matmul ceiling of the same precision,
and the peak memory of the case, measured in a fresh process (see benchmarks/common.py).
"""

from __future__ import annotations

import sys

import torch
from common import call_seconds, matmul_reference, median_seconds, parser, rounded, run, timed_between_ceilings

import elmgen.models.transformer as transformer
from elmgen.device import autocast
from elmgen.models import ModelConfig, Transformer, flops_per_token, preset
from elmgen.train import LOSSES, TrainConfig, make_optimizer, prepare


def run_case(c: dict) -> dict:
    if c["logits_chunk"]:  # the loss's chunk size for this case's process (0: elmgen's own)
        transformer.LOGITS_CHUNK = c["logits_chunk"]
    cfg = ModelConfig(
        **{**preset(c["preset"]), "dropout": 0.0}, kind=c["kind"], vocab=c["vocab"], grid_size=c["grid"], num_classes=10
    )
    model = Transformer(cfg).train()
    train = TrainConfig(
        precision=c["precision"], compile=c["compile"], activation_checkpointing=c["activation_checkpointing"]
    )
    prepare(model, train, world=1)  # compiles in place, as training does
    opt = make_optimizer(model, train)
    sub = torch.randint(0, cfg.vocabulary.size, (c["batch"], cfg.num_cells, cfg.vocabulary.num_subcodes))
    labels = torch.randint(0, cfg.num_classes, (c["batch"],))

    def step():
        with autocast(torch.device("cpu"), train.precision):
            loss = LOSSES[c["kind"]](model, labels, sub)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    first = call_seconds(step)  # compiles with --compile
    call_seconds(step)  # the second step still pays for first use of optimizer state and gradient memory
    if c["profile"]:  # where a step's time goes, by operator: printed to stderr, the JSON line stays on stdout
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=c["profile"]), file=sys.stderr)
    seconds, ceiling = timed_between_ceilings(
        lambda: matmul_reference(c["matmul_size"]), lambda: median_seconds(step, c["repeats"])
    )
    tokens = c["batch"] * cfg.num_cells
    achieved = flops_per_token(cfg)["train"] * tokens / seconds / 1e9
    return rounded(
        {
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "first_step_seconds": first,
            "step_seconds": seconds,
            "tokens_per_s": tokens / seconds,
            "achieved_gflops": achieved,
            **ceiling,
            "share_of_matmul": achieved / ceiling[f"matmul_gflops_{c['precision']}"],
        }
    )


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--presets", nargs="+", default=["tiny", "B"])
    p.add_argument("--kind", nargs="+", default=["ar"], choices=["ar", "mlm"])
    p.add_argument("--vocab", default="2-8")
    p.add_argument("--grid", type=int, default=16)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--compile", action="store_true", help="compile the model in place, as training with --compile does")
    p.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute each block in the backward pass, as train.activation_checkpointing=true does",
    )
    p.add_argument(
        "--profile", type=int, default=0, metavar="N", help="print the N operators taking most of one step (profiler)"
    )
    p.add_argument("--matmul-size", type=int, default=2048, help="side of the reference matmul")
    p.add_argument(
        "--logits-chunk",
        type=int,
        nargs="+",
        default=[0],
        help="logits the loss holds at a time, one case each (0: elmgen's LOGITS_CHUNK; 1e12: the whole batch)",
    )
    a = p.parse_args()
    cases = [
        {
            "bench": "train_step",
            "preset": name,
            "kind": kind,
            "vocab": a.vocab,
            "grid": a.grid,
            "batch": a.batch,
            "precision": a.precision,
            "compile": a.compile,
            "activation_checkpointing": a.activation_checkpointing,
            "matmul_size": a.matmul_size,
            "logits_chunk": chunk,
            "profile": a.profile,
        }
        for name in a.presets
        for kind in a.kind
        for chunk in a.logits_chunk
    ]
    run(a, __file__, cases, run_case)


if __name__ == "__main__":
    main()

"""elmgen against LlamaGen on the same work, side by side on this machine (issue 15).

    python benchmarks/peers.py --llamagen PATH [--rounds 2] [--batch 8] [--train-batch 16] [--compile]

PATH is a checkout of github.com/FoundationVision/LlamaGen that you provide; its code is imported from
there in the LlamaGen cases' own processes and nothing of it is copied here. The shape is LlamaGen's
GPT-B (12 layers, width 768, 12 heads, SwiGLU 2048), a 16,384-entry vocabulary (elmgen `1-14`), 1000
classes, a 16x16 grid, random weights, dropout off in both:

- AR sampling: `--batch` images of 256 tokens with classifier-free guidance 2.0 (batch doubled),
  temperature 1, no top-k, KV-cached (LlamaGen's `generate`, elmgen's `generate`), fp32 eager and bf16
  (elmgen under autocast; LlamaGen with its weights cast to bf16, as its `sample_c2i.py` does); image tokens/s;
- a training step: `--train-batch` sequences, bf16 autocast, fused AdamW, gradient clipping 1.0 (LlamaGen's
  `Transformer.forward(..., targets)` loss, elmgen's trainer loss); tokens/s. With `--compile` both models are
  compiled in place (`Module.compile`, as both trainers' compile options do), else both run eager.

Every case first runs `--warmup` untimed calls: a training step's second call is still far slower than the
steady state (optimizer state and the allocator's first use of the gradients' memory), so one warm-up call
is not enough. Each row keeps the time of every call (`call_seconds`).

Each case runs in its own fresh process, the two systems alternating, `--rounds` times; the summary prints
the median of each and the ratio elmgen / LlamaGen. Only ratios from one run count: this machine's speed
drifts between minutes.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
from common import call_seconds, parser, rounded, run

from elmgen.device import autocast
from elmgen.models import ModelConfig, Transformer, preset
from elmgen.sampling import SampleConfig, generate
from elmgen.train import LOSSES, TrainConfig, make_optimizer, prepare

GRID, CLASSES, CODES = 16, 1000, 16384


def llamagen_model(path: str):
    sys.path.insert(0, path)  # the user's checkout: imported in this case's process only
    from autoregressive.models.gpt import GPT_models

    return GPT_models["GPT-B"](
        vocab_size=CODES,
        block_size=GRID * GRID,
        num_classes=CLASSES,
        cls_token_num=1,
        model_type="c2i",
        token_dropout_p=0.0,
        resid_dropout_p=0.0,
        ffn_dropout_p=0.0,
    )


def elmgen_model() -> Transformer:
    cfg = ModelConfig(**{**preset("B"), "dropout": 0.0}, vocab="1-14", grid_size=GRID, num_classes=CLASSES)
    return Transformer(cfg)


def random_head(head: torch.nn.Linear) -> None:
    torch.nn.init.normal_(head.weight, std=0.02)  # both initialise the head to zero, which samples uniformly


def sampling_case(c: dict):
    labels = torch.arange(c["batch"]) % CLASSES
    if c["system"] == "llamagen":
        model = llamagen_model(c["llamagen"]).eval()  # puts the checkout on sys.path
        from autoregressive.models.generate import generate as lg_generate

        random_head(model.output)
        if c["precision"] == "bf16":  # as its sample_c2i.py runs bf16: the weights cast (its KV cache follows them)
            model.to(torch.bfloat16)

        def call():
            with torch.no_grad():
                return lg_generate(model, labels, GRID * GRID, cfg_scale=2.0, temperature=1.0, top_k=0, top_p=1.0)

    else:
        model = elmgen_model().eval()
        random_head(model.head)
        sample = SampleConfig(guidance_scale=2.0, guidance_schedule="constant", precision=c["precision"])
        seeds = list(range(c["batch"]))

        def call():
            return generate(model, labels, sample, seeds)

    return call, c["batch"] * GRID * GRID


def training_case(c: dict):
    tokens = torch.randint(0, CODES, (c["train_batch"], GRID * GRID))
    labels = torch.randint(0, CLASSES, (c["train_batch"],))
    if c["system"] == "llamagen":
        model = llamagen_model(c["llamagen"]).train()
        if c["compile"]:
            model.compile(dynamic=False)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)

        def loss_fn():
            return model(idx=tokens[:, :-1], cond_idx=labels, targets=tokens)[1]

    else:
        model = elmgen_model().train()
        train = TrainConfig(lr=1e-4, weight_decay=0.05, compile=c["compile"])
        prepare(model, train, world=1)  # compiles in place with --compile, as training does
        opt = make_optimizer(model, train)
        sub = tokens[:, :, None]  # 1-14: one sub-code a cell

        def loss_fn():
            return LOSSES["ar"](model, labels, sub)

    def call():
        with autocast(torch.device("cpu"), "bf16"):
            loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return call, c["train_batch"] * GRID * GRID


def run_case(c: dict) -> dict:
    call, tokens = (sampling_case if c["bench"] == "sampling" else training_case)(c)
    times = [call_seconds(call) for _ in range(c["warmup"] + c["repeats"])]
    seconds = statistics.median(times[c["warmup"] :])
    return rounded({"call_seconds": [round(t, 3) for t in times], "seconds": seconds, "tokens_per_s": tokens / seconds})


def summary(rows: list[dict]) -> None:
    print("\n| work | precision | elmgen tokens/s | LlamaGen tokens/s | elmgen / LlamaGen |\n|---|---|---|---|---|")
    for bench, precision in dict.fromkeys((r["bench"], r["precision"]) for r in rows):
        rate = {
            system: statistics.median(
                r["tokens_per_s"]
                for r in rows
                if (r["bench"], r["precision"], r["system"]) == (bench, precision, system)
            )
            for system in ("elmgen", "llamagen")
        }
        ratio = rate["elmgen"] / rate["llamagen"]
        print(f"| {bench} | {precision} | {rate['elmgen']:.0f} | {rate['llamagen']:.0f} | {ratio:.2f}x |")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--llamagen", help="a checkout of FoundationVision/LlamaGen (required)")
    p.add_argument("--rounds", type=int, default=2, help="alternating runs of each system per case")
    p.add_argument("--batch", type=int, default=8, help="images a sampling call")
    p.add_argument("--train-batch", type=int, default=16, help="sequences a training step")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before the timed ones, per case")
    p.add_argument("--compile", action="store_true", help="training: compile both models in place")
    p.add_argument("--work", nargs="+", default=["sampling", "training"], choices=["sampling", "training"])
    a = p.parse_args()
    if not a.case and not (Path(a.llamagen or "") / "autoregressive" / "models" / "gpt.py").is_file():
        sys.exit(f"peers.py: {a.llamagen} is not a LlamaGen checkout (no autoregressive/models/gpt.py)")
    work = [("sampling", "fp32"), ("sampling", "bf16")] * ("sampling" in a.work)
    work += [("training", "bf16")] * ("training" in a.work)
    cases = [
        {
            "bench": bench,
            "precision": precision,
            "system": system,
            "llamagen": str(Path(a.llamagen or "").resolve()),
            "batch": a.batch,
            "train_batch": a.train_batch,
            "warmup": a.warmup,
            "compile": a.compile and bench == "training",
        }
        for bench, precision in work
        for _ in range(a.rounds)
        for system in ("elmgen", "llamagen")
    ]
    rows = run(a, __file__, cases, run_case)
    if rows:
        summary(rows)


if __name__ == "__main__":
    main()

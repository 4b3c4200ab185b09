"""Autoregressive decoding in raster order: a prefill of the class token, then one KV-cached step per cell
(static shapes, so a compiled step is traced once)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch

from elmgen.device import autocast
from elmgen.models import Transformer
from elmgen.models.packed import can_pack, packed_linears
from elmgen.rng import uniforms_for
from elmgen.sampling.config import SampleConfig, step_rules
from elmgen.sampling.rules import guide, guided_labels, sample_logits

# Called after every decoding step with (step, the sub-codes so far (B, L, n), which cells are final (B, L)); the
# tensors are the decoder's own and change after the call: copy what is kept (progressive display).
OnStep = Callable[[int, torch.Tensor, torch.Tensor], None]


def prefill(model: Transformer, labels_in: torch.Tensor, caches) -> torch.Tensor:
    """Logits (B, n, V) of the first cell: the class tokens alone run through the model, filling the caches."""
    no_cells = torch.zeros(labels_in.shape[0], 0, model.n_sub, dtype=torch.long, device=labels_in.device)
    return model(labels_in, no_cells, caches)[:, -1]


def decode_one(decode_step, cell_B1n: torch.Tensor, t: int, caches) -> torch.Tensor:
    """Logits (B, n, V) of cell t after feeding cell t-1, at sequence position t, through the cached model."""
    return decode_step(cell_B1n, torch.tensor([t], device=cell_B1n.device), caches)[:, -1]


@torch.no_grad()
def generate_ar(
    model: Transformer,
    labels_B: torch.Tensor,
    cfg: SampleConfig,
    seeds: list[int],
    known_sub_BLn: torch.Tensor | None = None,
    known_BL: torch.Tensor | None = None,
    on_step: OnStep | None = None,
) -> torch.Tensor:
    """Raster-order decoding, one cell per step, with a KV cache unless cfg.kv_cache is off (then every step
    recomputes the whole prefix). Cells marked in `known_BL` are fed their `known_sub_BLn` codes instead of a
    draw (outpainting). `on_step` sees each cell t as drawn (cells 0..t final)."""
    cfg.validate(model.vocab_size)
    B, L, n = labels_B.shape[0], model.cfg.num_cells, model.n_sub
    uniforms_BLn = uniforms_for(seeds, (L, n)).to(labels_B.device)
    guided, labels_in = guided_labels(model, labels_B, cfg.guidance_scale)
    out_BLn = torch.zeros(B, L, n, dtype=torch.long, device=labels_B.device)

    def both(x):
        return torch.cat([x, x]) if guided else x

    cache_dtype = torch.bfloat16 if cfg.precision == "bf16" else None
    caches = model.new_caches(labels_in.shape[0], cache_dtype) if cfg.kv_cache else None
    decode_step = torch.compile(model.decode_step, dynamic=False) if cfg.compile else model.decode_step
    # bf16, eager, on the CPU: weights reordered once for the decode step's few-row matmuls (elmgen.models.packed).
    # Not in fp32, where they would be 1.8x faster too but change the rounding enough that the KV-cached and the
    # recomputing sampler no longer always draw the same tokens (docs/performance.md).
    pack = cfg.precision == "bf16" and not cfg.compile and can_pack(labels_B.device, torch.bfloat16)
    packed = packed_linears(model, labels_in.shape[0], torch.bfloat16) if pack else nullcontext()
    # One autocast region for the whole loop: weights are cast to bfloat16 once, not at every step.
    with packed, autocast(labels_B.device, cfg.precision):
        logits = prefill(model, labels_in, caches)
        for t in range(L):
            if t > 0 and caches is not None:
                logits = decode_one(decode_step, both(out_BLn[:, t - 1 : t]), t, caches)
            elif t > 0:
                logits = model(labels_in, both(out_BLn[:, :t]))[:, -1]
            scale, temperature = step_rules(cfg, t, L)
            logits = guide(logits.float(), guided, scale)
            draw_Bn = sample_logits(logits, temperature, cfg.top_k, cfg.top_p, uniforms_BLn[:, t])
            if known_BL is not None:
                draw_Bn = torch.where(known_BL[:, t, None], known_sub_BLn[:, t], draw_Bn)
            out_BLn[:, t] = draw_Bn
            if on_step is not None:
                on_step(t, out_BLn, (torch.arange(L, device=out_BLn.device) <= t).expand(B, L))
    return out_BLn

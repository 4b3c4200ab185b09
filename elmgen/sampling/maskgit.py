"""MaskGIT decoding for the masked model: every step samples all masked cells and keeps the most confident,
on the cosine schedule of `elmgen.schedules`."""

from __future__ import annotations

import torch

from elmgen.device import autocast
from elmgen.models import Transformer
from elmgen.rng import uniforms_for
from elmgen.sampling.ar import OnStep
from elmgen.sampling.config import SampleConfig, step_rules
from elmgen.sampling.rules import draw_from, guide, guided_labels, shape_logits
from elmgen.schedules import cells_left_masked


@torch.no_grad()
def generate_mlm(
    model: Transformer,
    labels_B: torch.Tensor,
    cfg: SampleConfig,
    seeds: list[int],
    known_sub_BLn: torch.Tensor | None = None,
    known_BL: torch.Tensor | None = None,
    on_step: OnStep | None = None,
) -> torch.Tensor:
    """MaskGIT: start with every unknown cell masked; each step samples every masked cell, keeps the most
    confident (log p averaged over sub-codes + annealed Gumbel noise) and re-masks the rest on a cosine
    schedule. Cells marked in `known_BL` keep their `known_sub_BLn` codes throughout (inpainting). `on_step`
    sees every step's cells, the revealed and known ones final."""
    cfg.validate(model.vocab_size)
    B, L, n, S = labels_B.shape[0], model.cfg.num_cells, model.n_sub, cfg.steps
    device = labels_B.device
    noise_BILm = uniforms_for(seeds, (S, L, n + 1)).to(device)  # n token draws + 1 Gumbel per cell
    guided, labels_in = guided_labels(model, labels_B, cfg.guidance_scale)
    masked_BL = torch.ones(B, L, dtype=torch.bool, device=device) if known_BL is None else ~known_BL.to(device)
    sub_BLn = torch.full((B, L, n), model.mask_index, dtype=torch.long, device=device)
    if known_sub_BLn is not None:
        sub_BLn = torch.where(masked_BL[..., None], sub_BLn, known_sub_BLn.to(device))
    unknown_B = masked_BL.sum(-1)
    for t in range(S):
        x = torch.cat([sub_BLn, sub_BLn]) if guided else sub_BLn
        with autocast(device, cfg.precision):
            logits = model(labels_in, x)[:, 1:].float()
        scale, temperature = step_rules(cfg, t, S)
        logits = guide(logits, guided, scale)
        shaped = shape_logits(logits, temperature, cfg.top_k, cfg.top_p)  # once: drawn from and scored
        draw_BLn = shaped.argmax(-1) if temperature == 0 else draw_from(shaped, noise_BILm[:, t, :, :n])
        logp = shaped.log_softmax(-1)
        confidence_BL = logp.gather(-1, draw_BLn[..., None]).squeeze(-1).mean(-1)
        u = noise_BILm[:, t, :, n].clamp(1e-20, 1 - 1e-7)
        confidence_BL = confidence_BL + cfg.mask_noise * (1 - (t + 1) / S) * -torch.log(-torch.log(u))
        confidence_BL = confidence_BL.masked_fill(~masked_BL, float("inf"))  # known cells are never re-masked
        # The least confident `keep` cells stay masked; every step reveals at least one cell.
        keep_B = torch.minimum(cells_left_masked(t, S, unknown_B), masked_BL.sum(-1) - 1).clamp_min(0)
        still_BL = confidence_BL.argsort(-1).argsort(-1) < keep_B[:, None]
        sub_BLn = torch.where((masked_BL & ~still_BL)[..., None], draw_BLn, sub_BLn)
        masked_BL = still_BL
        if on_step is not None:
            on_step(t, sub_BLn, ~masked_BL)
    return sub_BLn

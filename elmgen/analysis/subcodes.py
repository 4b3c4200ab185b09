"""What the factorized vocabulary gives up: the dependence between the sub-codes of one cell that a model's
independent sub-code heads cannot express.

With the vocabulary n-c, the LM predicts the n sub-codes of a cell from one hidden state h, each on its own:
p(s_1..s_n | h) = prod_i p_i(s_i | h). What the sub-codes of a cell tell about each other beyond h is lost:
the conditional total correlation TC = sum_i H(s_i | h) - H(s_1..s_n | h), which is the mutual information
I(s_1; s_2 | h) for n = 2 (nats per cell).

It is estimated with two probes fitted on the frozen model's hidden states, of the same width, steps and
seed, each stopped early on a tenth of its fit rows: a factorized one (sub-code i from h) and a joint one
(sub-code i from h and the sub-codes before it: the chain rule, so it can express any joint distribution).
Their cross-entropies on held-out sequences bound the two entropies from above; their gap estimates TC
(exact when both probes reach their optimum), with a paired bootstrap interval over the held-out sequences
(the cells of one sequence are not independent). Score it on codes the model was not trained on (--codes
of held-out images): on its training codes the hidden states carry what the model memorised.
Shapes: N rows (cells), n sub-codes, V values of a sub-code, d model width, w probe width.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from elmgen.analysis.attention import AttentionConfig, model_input, predicted_cells, real_sequences
from elmgen.analysis.names import run_names, write_result
from elmgen.errors import ElmgenError
from elmgen.models import Transformer, count_params, load_model
from elmgen.plots import pyplot, save_figure
from elmgen.stats import paired_bootstrap

CHECK_EVERY = 25  # probe steps between two validation checks (early stopping)


@dataclass
class SubcodesConfig:
    codes: str | None = None  # code folder of the sequences (default: the one the model was trained on)
    num_sequences: int = 1024  # sequences whose cells are probed (a share of them held out)
    held_out: float = 0.25  # share of the sequences the probes are scored on, never fitted on
    mask_ratio: float = 0.5  # MLM: share of cells masked in the input; the masked cells are probed
    width: int = 256  # hidden width of both probes
    steps: int = 1000  # AdamW steps of each probe at most (each keeps its best validated weights)
    batch_size: int = 1024  # cells per probe step (and sequences per model forward: a 32nd of it)
    lr: float = 3e-3  # probe learning rate
    seed: int = 0  # picks the sequences, the held-out share, the MLM masks and the probes' batches

    def validate(self) -> None:
        if self.num_sequences < 2 or self.width < 1 or self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ElmgenError("sequences (>= 2), width, steps, batch size and learning rate must be positive")
        if not 0 < self.held_out < 1:
            raise ElmgenError(f"held_out must be in (0, 1), not {self.held_out}")
        if not 0 < self.mask_ratio < 1:
            raise ElmgenError(f"mask_ratio must be in (0, 1), not {self.mask_ratio}")


class Probe(nn.Module):
    """p(s_i | h) (factorized) or p(s_i | h, s_<i) (joint) for each sub-code i: a one-hidden-layer MLP whose
    hidden pre-activation is h's projection plus an embedding of which sub-code it predicts, plus (joint) an
    embedding of each earlier sub-code's value and place."""

    def __init__(self, d: int, n: int, V: int, width: int, joint: bool):
        super().__init__()
        self.n, self.V, self.joint = n, V, joint
        self.inp = nn.Linear(d, width)
        self.which = nn.Parameter(torch.zeros(n, width))
        self.earlier = nn.Embedding(n * n * V, width) if joint else None  # (predicted i, earlier j, value)
        self.out = nn.Parameter(torch.randn(n, width, V) / math.sqrt(width))
        self.register_buffer("before_nn", torch.ones(n, n, dtype=torch.bool).tril(-1), persistent=False)

    def forward(self, h_Nd: torch.Tensor, s_Nn: torch.Tensor) -> torch.Tensor:
        """Logits (N, n, V) of each sub-code; the joint probe reads the true earlier ones (teacher forcing)."""
        z_Nnw = self.inp(h_Nd)[:, None] + self.which
        if self.earlier is not None:
            n, V = self.n, self.V
            i_nn, j_nn = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
            idx_Nnn = (i_nn * n + j_nn).to(s_Nn.device) * V + s_Nn[:, None, :]
            z_Nnw = z_Nnw + (self.earlier(idx_Nnn) * self.before_nn[..., None]).sum(2)
        return torch.einsum("Nnw,nwV->NnV", torch.nn.functional.gelu(z_Nnw), self.out)


def row_nats(logits_NnV: torch.Tensor, s_Nn: torch.Tensor) -> torch.Tensor:
    """(N,) cross-entropy of each row's whole cell: the sum over its sub-codes (nats)."""
    return torch.nn.functional.cross_entropy(logits_NnV.transpose(1, 2), s_Nn, reduction="none").sum(1)


def fit_probe(probe: Probe, h_Nd: torch.Tensor, s_Nn: torch.Tensor, cfg: SubcodesConfig) -> Probe:
    """`probe` fitted by AdamW (cosine decay) on random batches of 90% of the rows, drawn from cfg.seed, and
    stopped early: it keeps the weights of its best cross-entropy on the other 10%, measured every
    CHECK_EVERY steps (the probes must not memorise the fit rows, or the gap measures overfitting)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    order_N = torch.randperm(len(h_Nd), generator=gen)
    val_N, fit_N = order_N[: max(1, len(h_Nd) // 10)], order_N[max(1, len(h_Nd) // 10) :]
    opt = torch.optim.AdamW(probe.parameters(), lr=cfg.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    best, best_state = math.inf, None
    for step in range(cfg.steps + 1):
        if step % CHECK_EVERY == 0 or step == cfg.steps:
            val = float(probe_nats(probe, h_Nd[val_N], s_Nn[val_N]).mean())
            if val < best:
                best, best_state = val, {k: v.clone() for k, v in probe.state_dict().items()}
        if step == cfg.steps:
            break
        probe.train()
        rows = fit_N[torch.randint(0, len(fit_N), (min(cfg.batch_size, len(fit_N)),), generator=gen)]
        loss = row_nats(probe(h_Nd[rows], s_Nn[rows]), s_Nn[rows]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    probe.load_state_dict(best_state)
    return probe.eval()


@torch.no_grad()
def probe_nats(probe: Probe, h_Nd: torch.Tensor, s_Nn: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """(N,) the probe's cross-entropy of each row's cell (nats), in chunks of rows."""
    probe.eval()
    return torch.cat(
        [
            row_nats(probe(h_Nd[i : i + chunk], s_Nn[i : i + chunk]), s_Nn[i : i + chunk])
            for i in range(0, len(h_Nd), chunk)
        ]
    )


def factorization_gap(
    h_fit_Nd: torch.Tensor,
    s_fit_Nn: torch.Tensor,
    h_eval_Nd: torch.Tensor,
    s_eval_Nn: torch.Tensor,
    group_N: np.ndarray,
    V: int,
    cfg: SubcodesConfig,
) -> dict:
    """Both probes fitted on the fit rows and scored on the eval rows (nats per cell): factorized, joint, and
    their gap (the TC estimate) with a paired bootstrap interval over the eval rows' groups (`group_N`: each
    eval row's sequence)."""
    d, n = h_fit_Nd.shape[1], s_fit_Nn.shape[1]
    nats = {}
    for joint in (False, True):
        torch.manual_seed(cfg.seed)  # both probes start from the same draws where their shapes agree
        probe = fit_probe(Probe(d, n, V, cfg.width, joint), h_fit_Nd, s_fit_Nn, cfg)
        nats[joint] = probe_nats(probe, h_eval_Nd, s_eval_Nn).double()
    groups, group_N = np.unique(group_N, return_inverse=True)
    counts = np.bincount(group_N)

    def per_group(x_N: torch.Tensor) -> np.ndarray:
        return np.bincount(group_N, x_N.numpy(), len(groups)) / counts

    gap = paired_bootstrap(per_group(nats[True]), per_group(nats[False]), seed=cfg.seed)
    return {
        "factorized_nats": float(nats[False].mean()),
        "joint_nats": float(nats[True].mean()),
        "gap_nats": float((nats[False] - nats[True]).mean()),
        "gap_low": gap["low"],
        "gap_high": gap["high"],
        "gap_significant": gap["significant"],
        "eval_cells": len(h_eval_Nd),
        "eval_sequences": len(groups),
    }


@torch.no_grad()
def probed_cells(
    model: Transformer, labels_B: torch.Tensor, x_BTn: torch.Tensor, sub_BLn: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hidden states that predict cells, with those cells: (h (N, d), sub-codes (N, n), the sequence (N,)
    and the model's own cross-entropy (N,)) over every cell for AR (position t predicts cell t) and the masked
    cells for MLM."""
    model.eval()
    h, s, seq, own = [], [], [], []
    for i in range(0, len(labels_B), batch_size):
        h_BTd = model.hidden(labels_B[i : i + batch_size], x_BTn[i : i + batch_size]).float()
        sub = sub_BLn[i : i + batch_size]
        keep_BL = predicted_cells(model, x_BTn[i : i + batch_size])
        h_Nd = model.at_cells(h_BTd)[keep_BL]
        h.append(h_Nd)
        s.append(sub[keep_BL])
        seq.append((torch.arange(i, i + len(sub))[:, None].expand_as(keep_BL))[keep_BL])
        own.append(row_nats(model.logits(h_Nd).float(), sub[keep_BL]))
    return torch.cat(h), torch.cat(s), torch.cat(seq), torch.cat(own)


def model_subcodes(model: Transformer, meta: dict, cfg: SubcodesConfig) -> dict:
    """The factorization gap of one model on real sequences of its code folder."""
    mc = model.cfg
    if model.n_sub < 2:
        raise ElmgenError(f"the model's vocabulary {mc.vocab} has one sub-code a cell: nothing is factorized")
    labels_B, sub_BLn = real_sequences(model, meta, cfg.codes, cfg.num_sequences, cfg.seed)
    x_BTn = model_input(model, sub_BLn, AttentionConfig(mask_ratio=cfg.mask_ratio, seed=cfg.seed))
    h_Nd, s_Nn, seq_N, own_N = probed_cells(model, labels_B, x_BTn, sub_BLn, max(1, cfg.batch_size // 32))
    B = len(labels_B)
    order_B = torch.randperm(B, generator=torch.Generator().manual_seed(cfg.seed))
    held_B = torch.zeros(B, dtype=torch.bool)
    held_B[order_B[: max(1, round(B * cfg.held_out))]] = True
    if bool(held_B.all()):
        raise ElmgenError(f"{B} sequences leave none to fit the probes on: raise --num-sequences")
    ev = held_B[seq_N]
    gap = factorization_gap(h_Nd[~ev], s_Nn[~ev], h_Nd[ev], s_Nn[ev], seq_N[ev].numpy(), model.vocab_size, cfg)
    return {
        "kind": mc.kind,
        "vocab": mc.vocab,
        "subcodes": model.n_sub,
        "params": count_params(mc),
        "step": meta.get("step"),
        "sequences": B,
        "fit_cells": int((~ev).sum()),
        "model_nats": float(own_N[ev].double().mean()),  # the model's own heads on the same held-out cells
        **gap,
    }


def analyze_subcodes(models: list, out_dir, cfg: SubcodesConfig) -> dict:
    """subcodes.json and subcodes.png: the factorization gap of every model, with its interval."""
    cfg.validate()
    reports = {}
    for name, path in zip(run_names(models), models, strict=True):
        model, meta = load_model(path)
        reports[name] = {"path": str(path), **model_subcodes(model, meta, cfg)}
    return write_result(out_dir, "subcodes", {"config": asdict(cfg), "models": reports}, plot_subcodes)


def plot_subcodes(result: dict, path) -> None:
    """Left: held-out nats per cell of the model's heads and of both probes; right: the gap, 95% interval."""
    reports = result["models"]
    plt = pyplot()
    fig, (ax_n, ax_g) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    names = list(reports)
    x = np.arange(len(names))
    keys = (("model_nats", "the model's heads"), ("factorized_nats", "factorized probe"), ("joint_nats", "joint probe"))
    for k, (key, label) in enumerate(keys):
        ax_n.bar(x + (k - 1) * 0.27, [reports[m][key] for m in names], 0.27, label=label)
    ax_n.set_ylabel("held-out nats per cell")
    ax_n.legend(fontsize=8)
    gaps = np.array([reports[m]["gap_nats"] for m in names])
    err = np.array([[g - reports[m]["gap_low"], reports[m]["gap_high"] - g] for g, m in zip(gaps, names, strict=True)])
    ax_g.bar(x, gaps, yerr=err.T, capsize=4, color="C3")
    ax_g.axhline(0, color="k", lw=0.8)
    ax_g.set_ylabel("nats per cell")
    ax_g.set_title("what factorizing costs: factorized - joint (95% CI)", fontsize=9)
    labels = [f"{m}\n{reports[m]['kind']} {reports[m]['vocab']}" for m in names]
    for ax in (ax_n, ax_g):
        ax.set_xticks(x, labels, fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    save_figure(fig, path)

"""`elmgen analyze subcodes`: the factorization gap on cases with a known answer, and on trained runs."""

import json
import math

import numpy as np
import pytest
import test_analysis
import torch

from elmgen.analysis import SubcodesConfig, factorization_gap
from elmgen.analysis.subcodes import Probe
from elmgen.cli import main

runs = test_analysis.runs  # two tiny 2-4 LMs on a 4x4 grid
CFG = SubcodesConfig(width=32, steps=300, batch_size=512, lr=1e-2)


def gap_of(h_Nd: torch.Tensor, s_Nn: torch.Tensor, V: int) -> dict:
    """The gap with the first three quarters of the rows fitted, the rest scored (a sequence of 8 rows each)."""
    fit = len(h_Nd) * 3 // 4
    groups = np.arange(len(h_Nd) - fit) // 8
    return factorization_gap(h_Nd[:fit], s_Nn[:fit], h_Nd[fit:], s_Nn[fit:], groups, V, CFG)


def test_copied_subcodes_cost_one_sub_code_of_information():
    gen = torch.Generator().manual_seed(0)
    s1_N = torch.randint(0, 4, (16000,), generator=gen)
    h_Nd = torch.randn(16000, 8, generator=gen)  # tells nothing about the codes
    r = gap_of(h_Nd, torch.stack([s1_N, s1_N], 1), 4)
    assert r["factorized_nats"] == pytest.approx(2 * math.log(4), abs=0.05)
    assert r["joint_nats"] == pytest.approx(math.log(4), abs=0.05)
    assert r["gap_nats"] == pytest.approx(math.log(4), abs=0.08) and r["gap_significant"]
    assert r["gap_low"] < r["gap_nats"] < r["gap_high"]


def test_independent_subcodes_cost_nothing():
    gen = torch.Generator().manual_seed(1)
    s_Nn = torch.randint(0, 4, (16000, 2), generator=gen)
    r = gap_of(torch.randn(16000, 8, generator=gen), s_Nn, 4)
    assert r["factorized_nats"] == pytest.approx(2 * math.log(4), abs=0.05)
    assert abs(r["gap_nats"]) < 0.05


def test_dependence_explained_by_the_hidden_state_costs_nothing():
    gen = torch.Generator().manual_seed(2)
    s1_N = torch.randint(0, 4, (16000,), generator=gen)
    h_Nd = torch.nn.functional.one_hot(s1_N, 8).float() + 0.05 * torch.randn(16000, 8, generator=gen)
    r = gap_of(h_Nd, torch.stack([s1_N, (s1_N + 1) % 4], 1), 4)  # s2 follows s1, and both follow h
    assert r["factorized_nats"] < 0.05 and abs(r["gap_nats"]) < 0.03


def test_the_joint_probe_reads_only_earlier_sub_codes():
    probe = Probe(d=4, n=3, V=5, width=8, joint=True)
    h_Nd, s_Nn = torch.randn(6, 4), torch.randint(0, 5, (6, 3))
    changed = s_Nn.clone()
    changed[:, 2] = (changed[:, 2] + 1) % 5  # the last sub-code is read by no prediction
    assert torch.equal(probe(h_Nd, s_Nn), probe(h_Nd, changed))
    changed[:, 0] = (changed[:, 0] + 1) % 5  # the first is read by the second and third, not by itself
    a, b = probe(h_Nd, s_Nn), probe(h_Nd, changed)
    assert torch.equal(a[:, 0], b[:, 0]) and not torch.equal(a[:, 1:], b[:, 1:])


def test_cli_subcodes(runs, tmp_path, capsys):
    _, (a, b) = runs
    out = tmp_path / "sub"
    argv = ["analyze", "subcodes", "--model", str(a), str(b), "--out", str(out), "--num-sequences", "40"]
    assert main([*argv, "--steps", "20", "--width", "16"]) == 0
    result = json.loads((out / "subcodes.json").read_text())
    assert (out / "subcodes.png").stat().st_size > 0
    for r in result["models"].values():
        assert r["vocab"] == "2-4" and r["sequences"] == 40 and r["eval_sequences"] == 10
        assert r["eval_cells"] == 10 * 16 and r["fit_cells"] == 30 * 16  # AR: every cell of a 4x4 grid
        assert r["gap_low"] <= r["gap_nats"] <= r["gap_high"] and math.isfinite(r["model_nats"])
    assert "gap" in capsys.readouterr().out
    assert main([*argv, "--held-out", "1.5"]) == 2
    assert "held_out must be in (0, 1)" in capsys.readouterr().err

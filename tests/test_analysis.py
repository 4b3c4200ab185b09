import itertools
import json
import math
import sys

import numpy as np
import pytest
import torch

from elmgen.analysis import (
    attention_metrics,
    capture_attention,
    conditional_entropy,
    token_statistics,
    uniform_attention,
)
from elmgen.cli import main
from elmgen.errors import ElmgenError
from elmgen.models import ModelConfig, Transformer, preset
from elmgen.train import LMJob, TrainConfig, train_lm

LN2 = math.log(2)


def test_every_binary_2x2_grid_once_is_uniform_given_any_neighbours():
    grids = np.array(list(itertools.product([0, 1], repeat=4))).reshape(16, 2, 2)
    s = token_statistics(grids, 2)
    assert s["entropy"] == pytest.approx(LN2) and s["kl_uniform"] == pytest.approx(0, abs=1e-12)
    assert s["pair_kl_uniform"] == pytest.approx(0, abs=1e-12) and s["usage"] == 1.0
    for key in ("cond_entropy_left", "cond_entropy_up", "cond_entropy_left_up"):
        assert s[key] == pytest.approx(LN2)
    assert s["samples_per_context_left_up"] == 16 / 4  # 16 corner cells over the 4 (left, up) contexts


def test_copied_rows_are_predictable_from_above_only():
    top = np.array(list(itertools.product([0, 1], repeat=2)))  # all 4 first rows
    grids = np.stack([top, top], 1)  # second row = first row
    s = token_statistics(grids, 4)  # a vocabulary of 4 of which 2 are used
    assert s["usage"] == 0.5
    assert s["kl_uniform"] == pytest.approx(math.log(4) - LN2)
    assert s["cond_entropy_up"] == pytest.approx(0, abs=1e-12)
    assert s["cond_entropy_left"] == pytest.approx(LN2)


def test_alternating_text_is_random_alone_and_determined_by_the_previous_token():
    s = token_statistics(np.tile([0, 1], 50)[None, None], 2)
    assert s["kl_uniform"] == pytest.approx(0, abs=1e-12)
    # of the 4 possible pairs only (0,1) (50 times) and (1,0) (49 times) occur
    pair_entropy = -(50 / 99) * math.log(50 / 99) - (49 / 99) * math.log(49 / 99)
    assert s["pair_kl_uniform"] == pytest.approx(2 * LN2 - pair_entropy)
    assert s["cond_entropy_left"] == pytest.approx(0, abs=1e-12)
    assert s["cond_entropy_up"] is None and s["cond_entropy_left_up"] is None  # text has no upper neighbour


def test_conditional_entropy_of_independent_columns_and_wide_codes():
    a, b = np.repeat([0, 1], 4), np.tile([0, 1], 4)
    assert conditional_entropy(a, b)[0] == pytest.approx(LN2)
    wide = np.array([2**40, 2**41, 2**40, 2**41], dtype=np.int64)  # joint ids never overflow
    assert conditional_entropy(wide, wide)[0] == pytest.approx(0, abs=1e-12)


def test_attention_metrics_on_a_hand_made_map():
    # 2x2 grid: the first cell attends to the class token only, the other three to cell 0, at distances
    # 1, 1 and sqrt(2).
    attn = torch.zeros(1, 5, 5)
    attn[0, :2, 0] = 1.0
    attn[0, 2:, 1] = 1.0
    m = {k: v[0] for k, v in attention_metrics(attn, 2, radii=(1, 2), global_radius=1.2).items()}
    assert m["mean_distance"] == pytest.approx((2 + math.sqrt(2)) / 3)
    assert m["cls_share"] == pytest.approx(0.25)
    assert m["within_r1"] == pytest.approx(0.5) and m["within_r2"] == pytest.approx(0.75)
    assert m["global_share"] == pytest.approx(0.25)


def test_sink_and_long_range_context_are_told_apart():
    # 4x4 grid, global radius 1 (every cell's mirror cell (3-r, 3-c) is farther). Head 0 is a pure sink: each
    # cell query puts half its attention on the class token and half on the first cell. Head 1 is pure context:
    # each query looks at its mirror cell, which for one query of 16 (cell (3,3)) is the first cell.
    attn = torch.zeros(2, 17, 17)
    attn[0, :, 0] = attn[0, :, 1] = 0.5
    attn[1, 0, 0] = 1.0
    for r, c in itertools.product(range(4), range(4)):
        attn[1, 1 + 4 * r + c, 1 + 4 * (3 - r) + (3 - c)] = 1.0
    m = attention_metrics(attn, 4, radii=(1,), global_radius=1.0)
    assert m["sink_share"] == pytest.approx([1.0, 1 / 16])
    assert m["context_share"] == pytest.approx([0.0, 15 / 16])
    assert m["global_share"] == pytest.approx([0.5 * 13 / 16, 1.0])  # 13 cells lie beyond radius 1 of cell 0
    assert m["far_top_key"][0] == 1 and m["far_top_key_share"] == pytest.approx([1.0, 1 / 16])
    alone = attention_metrics(attn, 4, radii=(1,), global_radius=1.0, sink_positions=(0,))
    assert alone["sink_share"] == pytest.approx([0.5, 0.0])  # the first cell no longer counts as a sink ...
    assert alone["context_share"] == pytest.approx([0.5 * 13 / 16, 1.0])  # ... so its far mass is "context"


def test_uniform_causal_attention_figures():
    m = {k: v[0] for k, v in attention_metrics(uniform_attention(5, causal=True), 2).items()}
    # queries see 1..4 cells plus the class token: class shares 1/2, 1/3, 1/4, 1/5
    assert m["cls_share"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 4 + 1 / 5) / 4)
    # cell mass at distance > 0: cell (0,1) 1/3 at d 1; cell (1,0) 1/4 at d 1 and sqrt 2; cell (1,1) 1/5
    # at d 1, 1 and sqrt 2; out of all the mass on cells
    cell_mass = 1 / 2 + 2 / 3 + 3 / 4 + 4 / 5
    assert m["mean_distance"] == pytest.approx((1 / 3 + (1 + math.sqrt(2)) / 4 + (2 + math.sqrt(2)) / 5) / cell_mass)


@pytest.mark.parametrize("kind", ["ar", "mlm"])
def test_capture_leaves_logits_unchanged_and_reproduces_each_layer(kind):
    cfg = ModelConfig(**{**preset("micro"), "vocab": "2-4", "grid_size": 4, "num_classes": 3, "kind": kind})
    model = Transformer(cfg).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)
    labels, sub = torch.tensor([0, 2]), torch.randint(0, 16, (2, 15 if kind == "ar" else 16, 2))
    outputs = []  # what each attention layer returned, to rebuild from the captured probabilities
    handles = [b.attn.register_forward_hook(lambda m, a, o: outputs.append((m, a[0], o))) for b in model.blocks]
    with torch.no_grad():
        plain = model(labels, sub)
        outputs.clear()
        with capture_attention(model) as maps:
            captured = model(labels, sub)
    for h in handles:
        h.remove()
    assert torch.equal(plain, captured)
    assert len(maps) == cfg.n_layer and maps[0].shape == (2, cfg.n_head, sub.shape[1] + 1, sub.shape[1] + 1)
    for attn_BHTS, (module, x_BTd, out) in zip(maps, outputs, strict=True):
        assert torch.allclose(attn_BHTS.sum(-1), torch.ones(()), atol=1e-6)
        if kind == "ar":
            assert torch.count_nonzero(attn_BHTS.triu(1)) == 0
        B, T, _ = x_BTd.shape
        v = module.wqkv(x_BTd).view(B, T, 3, module.n_head, module.head_dim)[:, :, 2].transpose(1, 2)
        rebuilt = module.wo((attn_BHTS @ v).transpose(1, 2).reshape(B, T, -1))
        assert torch.allclose(rebuilt, out, atol=1e-5)


def test_missing_tokenizers_is_a_clear_error(monkeypatch):
    from elmgen.analysis import bpe_tokens

    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes the import fail
    with pytest.raises(ElmgenError, match=r"elmgen\[analysis\]"):
        bpe_tokens("some text", 300)


def write_codes(path, n=48, grid=4, bits=8) -> None:
    """A code folder as `elmgen tokenize` writes it: cells copy their upper neighbour below the first row."""
    rng = np.random.default_rng(0)
    cells = np.repeat(rng.integers(0, 2**bits, size=(n, 1, grid)), grid, axis=1).reshape(1, n, grid * grid)
    path.mkdir()
    np.save(path / "shard_00000.npy", cells.astype(np.uint16))
    np.save(path / "labels.npy", np.arange(n) % 3)
    meta = {
        "tokenizer": str(path / "missing-tokenizer"),
        "tokenizer_fingerprint": "0",
        "kind": "bae",
        "bits": bits,
        "grid": grid,
        "image_size": 16,
        "vocab": "2-4",
        "num_classes": 3,
        "class_names": ["a", "b", "c"],
        "dataset": "test",
        "images": n,
        "views": 1,
        "count": n,
        "draws": 0,
        "shard_size": n,
        "shards": ["shard_00000.npy"],
    }
    (path / "meta.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    write_codes(root / "codes")
    out = []
    for name, width in (("a", 32), ("b", 64)):
        model = ModelConfig(**{**preset("micro"), "d_model": width, "vocab": "2-4", "grid_size": 4, "num_classes": 3})
        job = LMJob(model=model, train=TrainConfig(steps=4, batch_size=8, lr=1e-3, log_every=2, save_every=4))
        train_lm(job, root / "codes", root / name)
        out.append(root / name)
    return root, out


@pytest.mark.slow
def test_cli_randomness(runs, tmp_path, capsys):
    root, _ = runs
    text = tmp_path / "corpus.txt"
    text.write_text("the cat sat on the mat. " * 40 + "a dog ran far away from the cat.\n" * 20)
    out = tmp_path / "rand"
    assert (
        main(
            [
                "analyze",
                "randomness",
                "--codes",
                str(root / "codes"),
                "--text",
                str(text),
                "--bpe-vocab",
                "280",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = {r["source"]: r for r in json.loads((out / "randomness.json").read_text())}
    assert set(rows) == {
        "codes cell (bae, K=8)",
        "codes sub-code 1/2 (2-4)",
        "codes sub-code 2/2 (2-4)",
        "text bytes",
        next(s for s in rows if s.startswith("text BPE-")),
    }
    cell = rows["codes cell (bae, K=8)"]
    assert cell["vocab_size"] == 256 and cell["tokens"] == 48 * 16  # no tokenizer at hand: 2^K
    assert cell["cond_entropy_up"] == pytest.approx(0, abs=1e-12)  # rows are copies
    assert rows["text bytes"]["vocab_size"] == 256 and rows["text bytes"]["kl_uniform"] > 2
    assert "| source |" in (out / "randomness.md").read_text() and (out / "randomness.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["analyze", "randomness", "--out", str(out)]) == 2
    assert "at least one code folder" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_attention_real_and_sampled(runs, tmp_path, capsys):
    _, (a, b) = runs
    out = tmp_path / "attn"
    assert (
        main(
            [
                "analyze",
                "attention",
                "--model",
                str(a),
                str(b),
                "--out",
                str(out),
                "--num-sequences",
                "6",
                "--query",
                "1",
                "1",
                "--query",
                "2",
                "3",
            ]
        )
        == 0
    )
    result = json.loads((out / "attention.json").read_text())
    assert set(result["models"]) == {"a", "b"}
    rep = result["models"]["a"]
    assert rep["sequences"] == 6 and len(rep["layers"]) == 2 and len(rep["layers"][0]["heads"]["cls_share"]) == 2
    layer = rep["layers"][0]
    assert 0 <= layer["within_r1"] <= layer["within_r2"] <= 1
    assert layer["cls_share"] + layer["within_r2"] + layer["global_share"] <= 1 + 1e-9
    assert layer["context_share"] <= layer["global_share"] and layer["cls_share"] <= layer["sink_share"] <= 1
    assert "context_share" in capsys.readouterr().out
    for png in ("attention-depth.png", "attention-a.png", "attention-b.png"):
        assert (out / png).stat().st_size > 0
    assert (
        main(
            [
                "analyze",
                "attention",
                "--model",
                str(a),
                "--out",
                str(tmp_path / "s"),
                "--sampled",
                "--num-sequences",
                "3",
                "--sink",
                "0",
            ]
        )
        == 0
    )
    sampled = json.loads((tmp_path / "s" / "attention.json").read_text())["models"]["a"]
    assert sampled["source"] == "sampled" and sampled["layers"][0]["sink_share"] == pytest.approx(
        sampled["layers"][0]["cls_share"]
    )
    capsys.readouterr()
    assert main(["analyze", "attention", "--model", str(a), "--out", str(out), "--query", "4", "0"]) == 2
    assert "query cells [[4, 0]] are not (row, col) cells of the 4x4 grid" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_loss(runs, tmp_path):
    _, (a, b) = runs
    assert main(["analyze", "loss", str(a), str(b), "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "loss.json").read_text())
    assert report["a"]["steps"] == [2, 4] and report["a"]["ln_vocab"] == pytest.approx(math.log(16))
    assert report["a"]["params"] < report["b"]["params"]
    assert report["b"]["final_loss_norm"] == pytest.approx(report["b"]["loss"][-1] / math.log(16))
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert main(["analyze", "loss", str(tmp_path / "nothing"), "--out", str(tmp_path)]) == 2

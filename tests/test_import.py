"""Importing released GPTs: state dicts built here in the official layouts (LlamaGen's gpt.py, ELM's
ar_model.py and mlm_model.py: their tensor names and shapes, random values), converted, saved and loaded.
Parity with the official code itself is checked outside the repo (docs/pretrained.md)."""

import argparse
import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_import_tokenizers import elm_state
from test_import_tokenizers import llamagen_state as vq_state

from elmgen import cli
from elmgen.checkpoint import CheckpointMeta, save_checkpoint
from elmgen.config import to_dict
from elmgen.errors import ElmgenError
from elmgen.hub import (
    elm_gpt,
    from_pretrained,
    import_checkpoint,
    llamagen_gpt,
    local_folder,
    read_state_dict,
    save_pretrained,
)
from elmgen.hub.gpt import heads_of
from elmgen.models import ModelConfig, Transformer, load_model
from elmgen.tokenizers import Autoencoder, TokenizerConfig

D, LAYERS, CLASSES, GRID = 64, 2, 10, 4


def hidden(d: int) -> int:  # the official FeedForward: find_multiple(int(2 * 4d / 3), 256)
    return 256 * math.ceil(int(8 * d / 3) / 256)


def blocks(d=D, layers=LAYERS) -> dict:
    h, sd = hidden(d), {}
    for i in range(layers):
        p = f"layers.{i}."
        sd[p + "attention.wqkv.weight"] = torch.randn(3 * d, d)
        sd[p + "attention.wo.weight"] = torch.randn(d, d)
        sd[p + "feed_forward.w1.weight"] = torch.randn(h, d)
        sd[p + "feed_forward.w3.weight"] = torch.randn(h, d)
        sd[p + "feed_forward.w2.weight"] = torch.randn(d, h)
        sd[p + "attention_norm.weight"] = torch.randn(d)
        sd[p + "ffn_norm.weight"] = torch.randn(d)
    return sd


def llamagen_state(codes=1024, d=D, layers=LAYERS) -> dict:
    return {
        "cls_embedding.embedding_table.weight": torch.randn(CLASSES + 1, d),
        "tok_embeddings.weight": torch.randn(codes, d),
        **blocks(d, layers),
        "norm.weight": torch.randn(d),
        "output.weight": torch.randn(codes, d),
    }


def elm_ar_state(n: int, c: int, d=D, layers=LAYERS, classes=CLASSES) -> dict:
    one = n == 1
    sd = {
        "cls_embedding.embedding_table.weight": torch.randn(classes + 1, d),
        **blocks(d, layers),
        "norm.weight": torch.randn(d),
    }
    for i in range(n):
        sd["tok_embedder.weight" if one else f"tok_embedder.{i}.weight"] = torch.randn(2**c, d)
        sd["output.weight" if one else f"output.{i}.weight"] = torch.randn(2**c, d)
    if not one:
        sd["proj.weight"] = torch.randn(d, n * d)
    return sd


def elm_mlm_state(c: int, cells=GRID * GRID, d=D, layers=LAYERS, classes=CLASSES) -> dict:
    entries = 2**c + 1  # the codes and the mask entry
    return {
        "cls_embedding.embedding_table.weight": torch.randn(classes + 1, d),
        "tok_embedder.weight": torch.randn(entries, d),
        "pos_embed.weight": torch.randn(cells, d),
        **blocks(d, layers),
        "norm.weight": torch.randn(d),
        "output.weight": torch.randn(entries, d),
        "mlm_layer.fc.weight": torch.randn(d, d),
        "mlm_layer.fc.bias": torch.randn(d),
        "mlm_layer.ln.weight": torch.randn(d),
        "mlm_layer.ln.bias": torch.randn(d),
        "mlm_layer.bias": torch.randn(1, 1, entries),
    }


def tokenizer_run(path, bits: int, quantizer="bae", codebook_size=1024):
    cfg = TokenizerConfig(
        in_channels=3,
        base_width=8,
        channel_mult=[1, 2, 2],
        latent_dim=8,
        quantizer=quantizer,
        num_bits=bits,
        codebook_size=codebook_size,
    )
    meta = CheckpointMeta(
        kind=quantizer,
        tokenizer=to_dict(cfg),
        bits=cfg.code_bits,
        num_codes=cfg.num_codes,
        image_size=4 * GRID,
        channels=3,
        grid=GRID,
    )
    save_checkpoint(path, 0, Autoencoder(cfg), meta)
    return path


def built(cfg: ModelConfig, state: dict) -> Transformer:
    model = Transformer(cfg)
    model.load_state_dict(state, strict=True)
    return model.eval()


def test_llamagen_names_and_inferred_config():
    sd = llamagen_state()
    cfg, state = llamagen_gpt(sd, grid_size=GRID, n_head=2)
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.vocab, cfg.num_classes) == (2, D, 2, "1-10", CLASSES)
    assert (cfg.kind, cfg.class_rope, cfg.head, cfg.num_codes) == ("ar", "zero", "linear", None)
    assert set(state) == set(Transformer(cfg).state_dict())
    assert torch.equal(state["blocks.1.mlp.w2.weight"], sd["layers.1.feed_forward.w2.weight"])
    assert torch.equal(state["blocks.0.attn.wqkv.weight"], sd["layers.0.attention.wqkv.weight"])
    assert torch.equal(state["cls_emb.weight"], sd["cls_embedding.embedding_table.weight"])
    assert torch.equal(state["head.weight"], sd["output.weight"])
    assert torch.equal(state["tok_proj.weight"], torch.eye(D))  # one table: the projection is the identity


def test_a_codebook_of_no_power_of_two_never_predicts_the_missing_codes():
    cfg, state = llamagen_gpt(llamagen_state(codes=1000), grid_size=GRID, n_head=2)
    assert (cfg.vocab, cfg.num_codes) == ("1-10", 1000)
    logits = built(cfg, state)(torch.tensor([0]), torch.randint(0, 1000, (1, 3, 1)))
    assert torch.isinf(logits[..., 1000:]).all() and torch.isfinite(logits[..., :1000]).all()


def test_heads_come_from_the_released_sizes():
    assert heads_of(24, 1024, None) == 16  # L
    assert heads_of(24, 3200, None) == 32  # LlamaGen 3B
    assert heads_of(48, 1792, None) == 28  # ELM 2B
    assert heads_of(2, 64, 4) == 4
    with pytest.raises(ElmgenError, match="--heads"):
        heads_of(2, 64, None)  # the micro preset is no released size


@pytest.mark.parametrize("n, c", [(1, 6), (2, 4), (3, 3)])
def test_elm_ar_tables_and_heads_are_fused_in_order(n, c):
    sd = elm_ar_state(n, c)
    cfg, state = elm_gpt(sd, grid_size=GRID, n_head=2)
    assert (cfg.vocab, cfg.kind, cfg.class_rope) == (f"{n}-{c}", "ar", "zero")
    names = [f"tok_embedder.{i}.weight" for i in range(n)] if n > 1 else ["tok_embedder.weight"]
    assert torch.equal(state["tok_emb.weight"], torch.cat([sd[k] for k in names]))
    heads = [k.replace("tok_embedder", "output") for k in names]
    assert torch.equal(state["head.weight"], torch.cat([sd[k] for k in heads]))
    assert torch.equal(state["tok_proj.weight"], sd["proj.weight"] if n > 1 else torch.eye(D))
    model = built(cfg, state)
    # sub-code j of a cell reads table j: changing sub-code 1 alone changes what embed_cells sees through table 1
    sub = torch.zeros(1, 1, n, dtype=torch.long)
    emb = torch.cat([sd[k][0] for k in names]) @ state["tok_proj.weight"].T
    assert torch.allclose(model.embed_cells(sub)[0, 0], emb, atol=1e-4)


def test_elm_mlm_gets_the_tied_head_and_drops_the_mask_logit():
    sd = elm_mlm_state(6)
    cfg, state = elm_gpt(sd, grid_size=GRID, n_head=2)
    assert (cfg.vocab, cfg.kind, cfg.head, cfg.class_rope) == ("1-6", "mlm", "tied", "zero")
    assert torch.equal(state["tok_emb.weight"], sd["tok_embedder.weight"])  # the mask entry is elmgen's too
    assert torch.equal(state["head.bias"], sd["mlm_layer.bias"][0, :, :64])
    model = built(cfg, state)
    assert model.mask_index == 64
    h_BTd = torch.randn(2, 5, D)
    x = F.layer_norm(F.gelu(h_BTd @ sd["mlm_layer.fc.weight"].T + sd["mlm_layer.fc.bias"]), (D,))
    x = x * sd["mlm_layer.ln.weight"] + sd["mlm_layer.ln.bias"]
    by_hand = x @ sd["tok_embedder.weight"][:64].T + sd["mlm_layer.bias"][0, :, :64]
    got = model.head(h_BTd, model.tok_emb.weight.view(1, 65, D)[:, :64])
    assert torch.allclose(got[:, :, 0], by_hand, atol=1e-4)


def test_the_zero_class_rotation_hides_the_class_token_from_every_key_score():
    cfg, state = llamagen_gpt(llamagen_state(), grid_size=GRID, n_head=2)
    model = built(cfg, state)
    assert model.rope_cos[0].abs().sum() == 0 and model.rope_sin[0].abs().sum() == 0
    # With the class key zero, the class embedding reaches the cells through the values only: the logits of
    # the cells then depend on the class, and a model with identity rotation differs from it.
    other = built(ModelConfig(**{**cfg.__dict__, "class_rope": "identity"}), state)
    labels, sub = torch.tensor([1]), torch.randint(0, 1024, (1, 5, 1))
    assert not torch.allclose(model(labels, sub), other(labels, sub), atol=1e-3)
    assert torch.allclose(model(labels, sub)[:, 0], other(labels, sub)[:, 0], atol=1e-4)  # alone, rotation is moot


def test_an_mlm_on_another_grid_is_refused_naming_the_tensor():
    with pytest.raises(ElmgenError, match=r"pos_embed.weight has 64 rows"):
        elm_gpt(elm_mlm_state(6, cells=64), grid_size=GRID, n_head=2)
    # The tables its forward never reads may be absent (the released MLM files' sizes leave no room for output)
    sd = {k: v for k, v in elm_mlm_state(6).items() if k not in ("pos_embed.weight", "output.weight")}
    assert elm_gpt(sd, grid_size=GRID, n_head=2)[0].kind == "mlm"


def test_a_mlm_with_several_sub_codes_is_refused():
    sd = {**elm_mlm_state(6), "proj.weight": torch.randn(D, 2 * D)}
    with pytest.raises(ElmgenError, match="own sequence position"):
        elm_gpt(sd, grid_size=GRID, n_head=2)


def test_a_tensor_of_no_known_part_is_refused():
    sd = {**elm_ar_state(1, 6), "layers.0.adaLN_modulation.1.weight": torch.randn(6 * D, D)}
    with pytest.raises(ElmgenError, match="adaLN_modulation.1.weight"):
        elm_gpt(sd, grid_size=GRID, n_head=2)


@pytest.mark.parametrize("layout", ["ddp", "fsdp", "compiled"])
def test_round_trip_through_a_run_folder(layout, tmp_path):
    sd = llamagen_state()
    wrapped = {
        "ddp": {"model": sd, "optimizer": {"state": {}}, "steps": 7, "args": argparse.Namespace(gpt_model="GPT-B")},
        "fsdp": sd,
        "compiled": {"model": {f"module._orig_mod.{k}": v for k, v in sd.items()}},
    }[layout]
    torch.save(wrapped, tmp_path / "c2i.pt")
    assert read_state_dict(tmp_path / "c2i.pt").keys() == sd.keys()
    tok = tokenizer_run(tmp_path / "vq", 10, quantizer="vq")
    run = import_checkpoint("llamagen", tmp_path / "c2i.pt", tmp_path / "lm", tokenizer=tok, n_head=2)
    loaded, meta = load_model(run)
    direct = built(*llamagen_gpt(sd, grid_size=GRID, n_head=2))
    labels, sub = torch.tensor([3, CLASSES]), torch.randint(0, 1024, (2, GRID * GRID - 1, 1))
    assert torch.equal(loaded(labels, sub), direct(labels, sub))
    assert meta["codes"]["tokenizer"] == str(tok.resolve()) and meta["codes"]["grid"] == GRID
    assert "MIT" in (run / "README.md").read_text()
    with pytest.raises(ElmgenError, match="already holds a checkpoint"):
        import_checkpoint("llamagen", tmp_path / "c2i.pt", run, tokenizer=tok, n_head=2)


@pytest.mark.parametrize("source", ["elm", "llamagen"])
def test_import_the_tokenizer_then_the_gpt_then_sample_through_the_cli(source, tmp_path, capsys, one_thread):
    # Official layouts at tiny sizes: a 2x downsampling tokenizer on 8 px images gives the 4x4 grid.
    if source == "elm":
        torch.save(elm_state(mult=(1, 2), bits=8), tmp_path / "binaryae_ema.th")
        torch.save(elm_ar_state(2, 4), tmp_path / "gpt.pth")
        tok_file, extra = tmp_path / "binaryae_ema.th", ["--deterministic"]
    else:
        torch.save({"model": vq_state(mult=(1, 2), codes=64)}, tmp_path / "vq_ds16_c2i.pt")
        torch.save({"model": llamagen_state(codes=64)}, tmp_path / "gpt.pth")
        tok_file, extra = tmp_path / "vq_ds16_c2i.pt", []
    tok, lm = str(tmp_path / "tok"), str(tmp_path / "lm")
    assert cli.main(["import", source, str(tok_file), "--out", tok, "--image-size", "8", *extra]) == 0
    assert cli.main(["import", source, str(tmp_path / "gpt.pth"), "--out", lm, "--tokenizer", tok, "--heads", "2"]) == 0
    out = str(tmp_path / "s")
    assert cli.main(["sample", "--model", lm, "--out", out, "--num-per-class", "1", *"--classes 0 1".split()]) == 0
    images = np.load(tmp_path / "s" / "samples.npz")["arr_0"]
    assert images.shape == (2, 8, 8, 3)
    capsys.readouterr()
    other = "llamagen" if source == "elm" else "elm"
    line = failure(["import", other, str(tok_file), "--out", str(tmp_path / "x")], capsys)
    assert f"import it with 'elmgen import {source}'" in line


def failure(argv, capsys) -> str:
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


class Planted:
    def __reduce__(self):
        return (exec, ("raise SystemExit('the pickle ran')",))


def test_a_pickle_that_needs_code_is_refused_in_one_line(tmp_path, capsys):
    torch.save({"model": llamagen_state(), "extra": Planted()}, tmp_path / "c2i.pt")
    tok = tokenizer_run(tmp_path / "vq", 10, quantizer="vq")
    line = failure(
        ["import", "llamagen", str(tmp_path / "c2i.pt"), "--out", str(tmp_path / "lm"), "--tokenizer", str(tok)], capsys
    )
    assert "will not be unpickled" in line and "exec" in line
    assert not (tmp_path / "lm").exists()


def test_a_mismatched_tensor_is_one_line_naming_it_and_the_expected_shape(tmp_path, capsys):
    sd = llamagen_state()
    sd["layers.1.feed_forward.w2.weight"] = torch.randn(D, 100)
    torch.save({"model": sd}, tmp_path / "c2i.pt")
    tok = tokenizer_run(tmp_path / "vq", 10, quantizer="vq")
    argv = ["import", "llamagen", str(tmp_path / "c2i.pt"), "--out", str(tmp_path / "lm"), "--tokenizer", str(tok)]
    line = failure([*argv, "--heads", "2"], capsys)
    assert "layers.1.feed_forward.w2.weight has shape (64, 100); expected (64, 256)" in line


def test_a_tokenizer_of_other_bits_or_a_missing_file_is_one_line(tmp_path, capsys):
    torch.save({"model": llamagen_state()}, tmp_path / "c2i.pt")
    tok = tokenizer_run(tmp_path / "bae", 8)
    argv = ["import", "llamagen", str(tmp_path / "c2i.pt"), "--out", str(tmp_path / "lm"), "--heads", "2"]
    assert "1024 codes of 10 bits" in failure([*argv, "--tokenizer", str(tok)], capsys)
    assert "needs --tokenizer" in failure(argv, capsys)
    argv[2] = str(tmp_path / "nothing.pt")
    assert "is not a file" in failure([*argv, "--tokenizer", str(tok)], capsys)
    (tmp_path / "cut.pt").write_bytes((tmp_path / "c2i.pt").read_bytes()[:200])
    argv[2] = str(tmp_path / "cut.pt")
    assert "not a readable torch checkpoint" in failure([*argv, "--tokenizer", str(tok)], capsys)


def exported(tmp_path):
    torch.save(elm_ar_state(2, 4), tmp_path / "L-2-4.pth")
    tok = tokenizer_run(tmp_path / "bae", 8)
    run = import_checkpoint("elm", tmp_path / "L-2-4.pth", tmp_path / "lm", tokenizer=tok, n_head=2)
    return run, save_pretrained(run, tmp_path / "export")


def test_save_pretrained_makes_a_folder_that_loads_alone(tmp_path):
    run, folder = exported(tmp_path)
    shutil.rmtree(tmp_path / "bae")  # the export carries its tokenizer
    model, meta = from_pretrained(folder)
    original, _ = load_model(run)
    labels, sub = torch.tensor([1]), torch.randint(0, 16, (1, 5, 2))
    assert torch.equal(model(labels, sub), original(labels, sub))
    assert meta["codes"]["tokenizer"] == str(folder / "tokenizer")
    tokenizer, tok_meta = from_pretrained(folder / "tokenizer")
    assert tok_meta["fingerprint"] == meta["codes"]["tokenizer_fingerprint"]
    assert "xuantonglll/ELM" in (folder / "README.md").read_text()
    assert "not stated" in (folder / "README.md").read_text()  # ELM's licence, as its repository states it
    with pytest.raises(ElmgenError, match="not an empty folder"):
        save_pretrained(run, folder)


def test_a_hub_id_loads_its_snapshot_and_fails_in_one_line_when_it_cannot(tmp_path, monkeypatch, capsys):
    import huggingface_hub  # the optional dependency (elmgen[hub]; in the dev extras)

    _, folder = exported(tmp_path)
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo: asked.append(repo) or str(folder))
    model, _ = from_pretrained("hf:someone/elm-l")
    assert asked == ["someone/elm-l"] and model.cfg.vocab == "2-4"
    assert local_folder(tmp_path / "lm") == tmp_path / "lm" and len(asked) == 1  # a local path: no hub call

    def offline(repo):
        raise huggingface_hub.errors.LocalEntryNotFoundError("no cached snapshot and outgoing traffic is disabled")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    line = failure(["sample", "--model", "hf:someone/elm-l", "--out", str(tmp_path / "s")], capsys)
    assert "cannot fetch someone/elm-l" in line and "outgoing traffic" in line


def test_attention_of_an_import_needs_codes_or_sampled_sequences(tmp_path, capsys, one_thread):
    run, _ = exported(tmp_path)
    line = failure(["analyze", "attention", "--model", str(run), "--out", str(tmp_path / "a")], capsys)
    assert "no code folder" in line and "--sampled" in line
    argv = ["analyze", "attention", "--model", str(run), "--out", str(tmp_path / "a"), "--sampled"]
    assert cli.main([*argv, "--num-sequences", "2"]) == 0
    assert (tmp_path / "a" / "attention.json").is_file()


def test_the_options_are_checked_and_the_tied_head_serves_several_sub_codes():
    with pytest.raises(ElmgenError, match="model.class_rope must be one of identity, zero"):
        ModelConfig(class_rope="rotated").validate()
    with pytest.raises(ElmgenError, match="model.head must be one of linear, tied"):
        ModelConfig(head="bert").validate()
    model = Transformer(ModelConfig(n_layer=1, d_model=32, n_head=2, vocab="2-3", grid_size=2, kind="mlm", head="tied"))
    sub = torch.full((2, 4, 2), model.mask_index)
    logits = model(torch.tensor([0, 1]), sub)
    assert logits.shape == (2, 5, 2, 8)
    # sub-code 1 scores against its own table (rows 9..16 of the stacked tables), not sub-code 0's
    model.tok_emb.weight.data[9:17] = 0
    assert torch.allclose(model.eval()(torch.tensor([0, 1]), sub)[..., 1, :], model.head.bias[1].expand(2, 5, 8))


def test_everything_downstream_works_on_imported_models(tmp_path, capsys, one_thread):
    """Official-layout ELM files at tiny sizes (8 px, a 4x4 grid of 8-bit codes), imported, then every command
    that reads a model or a tokenizer: tokenize, sample, outpaint (AR), inpaint (MLM) and the analyses."""
    torch.save(elm_state(mult=(1, 2), bits=8), tmp_path / "binaryae_ema.th")
    torch.save(elm_ar_state(2, 4), tmp_path / "ar.pth")
    torch.save(elm_mlm_state(8), tmp_path / "mlm.pth")
    tok, ar, mlm = (str(tmp_path / name) for name in ("tok", "ar", "mlm"))
    assert cli.main(["import", "elm", str(tmp_path / "binaryae_ema.th"), "--out", tok, "--image-size", "8"]) == 0
    for run, file in ((ar, "ar.pth"), (mlm, "mlm.pth")):
        assert cli.main(["import", "elm", str(tmp_path / file), "--out", run, "--tokenizer", tok, "--heads", "2"]) == 0
    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    for c in range(2):
        (folder / f"class{c}").mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"class{c}" / f"{i}.png")
    codes, out = str(tmp_path / "codes"), tmp_path / "out"
    assert cli.main(["tokenize", "--tokenizer", tok, "--data", str(folder), "--out", codes, "--vocab", "2-4"]) == 0
    commands = {
        "sample": ["sample", "--model", mlm, "--num-per-class", "1", "--classes", "0", "3", "--steps", "4"],
        "outpaint": ["outpaint", "--model", ar, "--width", "8", "--num-per-class", "1", "--classes", "1"],
        "inpaint": [*f"inpaint --model {mlm} --data {folder} --split train --indices 0 5 --region 1 1 2 2".split()],
        "attention": ["analyze", "attention", "--model", ar, mlm, "--codes", codes, "--num-sequences", "4"],
        "randomness": ["analyze", "randomness", "--codes", codes],
        "subcodes": [*f"analyze subcodes --model {ar} --codes {codes} --num-sequences 8 --steps 5".split()],
    }
    for name, argv in commands.items():
        assert cli.main([*argv, "--out", str(out / name)]) == 0, name
    capsys.readouterr()
    assert np.load(out / "sample" / "samples.npz")["arr_0"].shape == (2, 8, 8, 3)
    assert Image.open(out / "outpaint" / "outpaint.png").size[0] > Image.open(out / "outpaint" / "outpaint.png").size[1]
    assert (out / "inpaint" / "inpaint.png").is_file()
    attention = json.loads((out / "attention" / "attention.json").read_text())["models"]
    assert [m["vocab"] for m in attention.values()] == ["2-4", "1-8"]
    assert json.loads((out / "subcodes" / "subcodes.json").read_text())["models"]["ar"]["eval_sequences"] == 2
    assert (out / "randomness" / "randomness.json").is_file()
    assert cli.main(["model-info", mlm, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    model, _ = load_model(mlm)
    assert (info["params"], info["vocab"], info["grid_size"]) == (sum(p.numel() for p in model.parameters()), "1-8", 4)

    # a sampling sweep of the imported AR model, scored by a classifier of the folder's images: nothing trains
    cls = tmp_path / "cls"
    argv = ["train-classifier", "--data", str(folder), "--out", str(cls), "data.channels=3", "data.image_size=8"]
    assert cli.main([*argv, "train.steps=2", "classifier.feature_dim=3"]) == 0  # few features: an FID of 12 images
    sweep = tmp_path / "sweep.yaml"
    given = f"model: {{path: {ar}, classes: [0, 1], reference: {folder}, classifier: {cls}}}"
    sweep.write_text(f"{given}\nbase: {{num_per_class: 6}}\ngrid: {{sample.temperature: [1.0, 0.5]}}\n")
    assert cli.main(["sweep", str(sweep), "--out", str(out / "sweep"), "--replicates", "2"]) == 0
    with open(out / "sweep" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["sample.temperature"], r["replicates"]) for r in rows] == [("1.0", "2"), ("0.5", "2")]
    assert all(0 <= float(r["class_accuracy"]) <= 1 and float(r["fid"]) > 0 for r in rows)
    run = json.loads((out / "sweep" / "runs" / rows[0]["run"] / "metrics.json").read_text())
    assert run["lm"]["path"] == ar and run["sampling"]["images"] == 12 and not (out / "sweep" / "stages").exists()
    capsys.readouterr()
    sweep.write_text(f"{given}\ngrid: {{lm.model.vocab: [2-4]}}\n")
    assert cli.main(["sweep", str(sweep), "--out", str(out / "sweep2")]) == 2
    assert "the sweep varies lm.model.vocab, but model.path=" in capsys.readouterr().err
    sweep.write_text(f"model: {{path: {ar}, classes: [99]}}\ngrid: {{sample.temperature: [1.0]}}\n")
    assert cli.main(["sweep", str(sweep), "--out", str(out / "sweep3")]) == 2
    assert "classes [99] are out of range" in capsys.readouterr().err and not (out / "sweep3").exists()

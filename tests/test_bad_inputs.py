"""Every bad input of issue 11, as a user meets it: one line on stderr starting "elmgen: error:", exit status 2,
never a traceback, nothing accepted silently.

Table-driven: a row is a command line, with {placeholders} for the tiny runs and broken files built once for
the module ({out}: a fresh folder per row) and, shell-style, leading NAME=value environment settings; and a
substring the one-line message must contain. Usage errors (argparse) follow the same rule: elmgen's parser
prints them as one line too.
"""

import gzip
import json
import os
import shlex
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_idx
from PIL import Image
from test_cli import TOK

from elmgen.cli import main

ROWS = [
    # --out that is a file, lies under a file, or cannot be written
    ("train-tokenizer --out {file} train.steps=1", "is a file"),
    ("eval-tokenizer --tokenizer {tok} --out {file}", "is a file"),
    ("tokenize --tokenizer {tok} --out {file}", "is a file"),
    ("tokenize --tokenizer {tok} --out {file}/codes", "is a file, not a folder"),
    ("train --codes {codes} --out {file} train.steps=1", "is a file"),
    ("sample --model {ar} --out {file}", "is a file"),
    ("outpaint --model {ar} --out {file}", "is a file"),
    ("inpaint --model {mlm} --out {file} --region 0 0 2 2", "is a file"),
    ("train-classifier --out {file} train.steps=1", "is a file"),
    ("eval --samples {npz_ok} --ref fashion-mnist --classifier {clf} --out {tmp}", "is a folder"),
    ("ref-stats --ref fashion-mnist --classifier {clf} --out {file}/stats.npz", "is a file, not a folder"),
    ("analyze randomness --codes {codes} --out {file}", "is a file"),
    ("analyze attention --model {ar} --out {file}", "is a file"),
    ("analyze loss {ar} --out {file}", "is a file"),
    ("demo --out {file}", "is a file"),
    ("sweep {yaml_empty} --out {file}", "is a file"),
    ("train --codes {codes} --out /proc/elmgen-out train.steps=1", "not writable"),
    ("sample --model {ar} --out /proc/elmgen-out", "not writable"),
    ("eval --samples {npz_ok} --ref fashion-mnist --classifier {clf} --out /proc/elmgen.json", "not writable"),
    ("tokenize --tokenizer {tok} --out {tok}", "tokenizer folder"),
    ("tokenize --tokenizer {tok} --out {images_broken}", "not empty"),
    # damaged checkpoints and code folders
    ("sample --model {lm_huge_header} --out {out}", "model.safetensors"),
    ("sample --model {lm_truncated} --out {out}", "model.safetensors"),
    ("sample --model {lm_bad_config} --out {out}", "config.json"),
    ("serve --model {tok}", "not a language-model checkpoint"),  # before any port is opened
    ("serve --model {tmp}/nowhere", "no checkpoint found"),
    ("train --codes {codes_truncated} --out {out} train.steps=1", "shard_00000.npy"),
    ("train --codes {codes_bad_meta} --out {out} train.steps=1", "meta.json"),
    # config files and overrides
    ("train-tokenizer --out {out} --config {yaml_bad} train.steps=1", "not valid YAML"),
    ("train-tokenizer --out {out} --config {yaml_list} train.steps=1", "mapping of sections"),
    ("train-tokenizer --out {out} --config {tmp}/missing.yaml", "config file not found"),
    ("sweep {yaml_list} --out {out}", "mapping of sections"),
    ("train --codes {codes} --out {out} --config {yaml_number} train.steps=1", "mapping of sections"),
    ("train-tokenizer --out {out} train.stepz=3", "train.stepz"),
    ("train --codes {codes} --out {out} train.steps=abc", "train.steps"),
    ("train-tokenizer --out {out} train.steps", "key=value"),
    # training settings
    ("train --codes {codes} --out {out} train.steps=1 train.lr=-1", "lr"),
    ("train --codes {codes} --out {out} train.steps=1 train.lr=nan", "lr"),
    ("train --codes {codes} --out {out} train.time_budget_s=-5", "train.time_budget_s=-5.0 is out of range"),
    ("demo --out {out} --minutes 0", "--minutes: must be a number > 0"),
    ("demo --out {out} --minutes inf", "--minutes: must be a number > 0"),
    ("train-tokenizer --out {out} train.steps=1 train.save_every=0", "save_every"),
    ("train-classifier --out {out} train.steps=1 train.log_every=0", "log_every"),
    ("train-tokenizer --out {out} train.steps=1 loss.edge_weight=-1", "loss weights and loss.gan_start must be >= 0"),
    ("train-classifier --out {out} train.steps=1 blur=-0.5", "blur=-0.5: both must be >= 0"),
    ("train-classifier --out {out} train.steps=1 blur=nan", "blur=nan: both must be >= 0"),
    ("demo --out {out} classifier.blur=-1", "blur=-1.0: both must be >= 0"),  # before any stage trains
    ("demo --out {out} views.draws=-1", "views.draws=-1: Bernoulli draws are a number >= 0"),
    ("demo --out {out} views.shifts=-2", "views.shifts=-2: shifted copies are a number >= 0"),
    (
        "demo --out {out} views.draws=2 tokenizer.tokenizer.quantizer=fsq",
        "(this run's tokenizer: fsq); use views.draws=0",
    ),
    ("eval-tokenizer --tokenizer {tok} --out {out} --device cuda:99", "CUDA"),
    ("train --codes {codes} --out {out} train.steps=1 train.device=cuda:99", "CUDA"),
    ("train --codes {codes} --out {out} --grad-accum 0", "--grad-accum"),
    # sizes that would need tens of GB
    ("train-tokenizer --out {out} train.steps=1 data.image_size=65536", "GB"),
    ("train --codes {codes} --out {out} train.steps=1 train.batch_size=100000000", "GB"),
    # counts, sizes and seeds
    ("sample --model {ar} --out {out} --num-per-class 0", "--num-per-class"),
    ("sample --model {ar} --out {out} --batch-size 0", "--batch-size"),
    ("sample --model {ar} --out {out} --seed -1", "--seed"),
    ("sample --model {ar} --out {out} --classes 10", "out of range"),
    ("RANK=2 WORLD_SIZE=2 sample --model {ar} --out {out}", "RANK=2 and WORLD_SIZE=2"),
    ("WORLD_SIZE=40 sample --model {ar} --out {out} --num-per-class 1", "40 processes for 10 images"),
    ("outpaint --model {ar} --out {out} --num-per-class 0", "--num-per-class"),
    ("tokenize --tokenizer {tok} --out {out} --limit 0", "--limit"),
    ("tokenize --tokenizer {tok} --out {out} --batch-size 0", "--batch-size"),
    ("eval-tokenizer --tokenizer {tok} --out {out} --limit 0", "--limit"),
    ("eval --samples {npz_ok} --ref fashion-mnist --classifier {clf} --limit 0", "--limit"),
    ("eval --samples {npz_ok} --ref fashion-mnist --classifier {clf} --k 0", "--k"),
    ("eval --samples {npz_ok} --ref fashion-mnist --classifier {clf} --splits 0", "--splits"),
    ("model-info tiny --grid -4", "--grid"),
    ("model-info tiny --grid 0", "--grid"),
    ("model-info tiny --batch-per-gpu 0", "--batch-per-gpu"),
    ("model-info tiny --gpus 0", "--gpus"),
    ("model-info tiny n_head=0", "n_head=0"),
    ("analyze attention --model {ar} --out {out} --num-sequences 0", "number of sequences"),
    ("analyze randomness --text {file} --out {out} --bpe-vocab 0", "--bpe-vocab"),
    ("check-data {images_broken} --workers 0", "--workers"),
    # sample files
    ("eval --samples {npz_empty} --ref fashion-mnist --classifier {clf}", "(0, 32, 32, 1)"),
    ("eval --samples {npz_no_arr0} --ref fashion-mnist --classifier {clf}", "holds no arr_0"),
    ("eval --samples {npz_float} --ref fashion-mnist --classifier {clf}", "float32"),
    ("eval --samples {npz_float_labels} --ref fashion-mnist --classifier {clf}", "arr_1"),
    ("eval --samples {file}.npz --ref fashion-mnist --classifier {clf}", "samples not found"),
    ("eval --samples {npz_ok} --ref {npz_bad_stats} --classifier {clf}", "statistics of shapes"),
    # sampling options: one validation for sample, outpaint, inpaint (and demo, sweep)
    ("sample --model {ar} --out {out} --temperature nan", "--temperature"),
    ("sample --model {ar} --out {out} --temperature-end inf", "--temperature-end"),
    ("sample --model {ar} --out {out} --guidance-scale nan", "--guidance-scale"),
    ("sample --model {ar} --out {out} --guidance-scale -1", "--guidance-scale"),
    ("sample --model {ar} --out {out} --cfg-scale -1", "--guidance-scale"),  # the option's name before the rename
    ("sample --model {ar} --out {out} --guidance-power 0", "--guidance-power"),
    ("sample --model {ar} --out {out} --guidance-interval 0.8 0.2", "--guidance-interval"),
    ("sample --model {ar} --out {out} --top-p 0", "--top-p"),
    ("sample --model {ar} --out {out} --top-k 100000", "vocabulary size 16"),
    ("outpaint --model {ar} --out {out} --temperature nan", "--temperature"),
    ("outpaint --model {ar} --out {out} --stride 0", "--stride"),
    ("outpaint --model {ar} --out {out} --width 4096 --height 4096", "windows"),
    ("inpaint --model {mlm} --out {out} --region 0 0 2 2 --top-p 5", "--top-p"),
    ("inpaint --model {mlm} --out {out} --region 0 0 2 2 --temperature -1", "--temperature"),
    ("inpaint --model {mlm} --out {out} --region 0 0 2 2 --top-k 100000", "vocabulary size 16"),
    ("inpaint --model {mlm} --out {out} --region 0 0 2 2 --mask-noise -5", "--mask-noise"),
    ("inpaint --model {mlm} --out {out} --region 0 0 2 2 --steps 0", "--steps"),
    ("inpaint --model {mlm} --out {out} --region 6 6 4 4", "must fit"),
    ("inpaint --model {mlm} --out {out} --region 0 0 0 2", "must fit"),
    ("inpaint --model {mlm} --out {out} --region 0 0 2 2 --indices -1", "out of range"),
    ("demo --out {out} sample.temperature=nan", "--temperature"),
    ("sweep {yaml_empty} base.sample.top_p=5 --out {out}", "--top-p"),
    # image data
    ("train-tokenizer --out {out} train.steps=1 --data {images_empty_class}", "holds no images"),
    ("train-tokenizer --out {out} train.steps=1 --data {images_broken} data.channels=3", "broken.png"),
    ("check-data {images_broken}", "1 bad"),
    ("check-data {images_empty_class}", "1 bad"),
    ("ELMGEN_FASHION_MNIST={float_labels} train-tokenizer --out {out} train.steps=1", "unsigned bytes"),
    # the command line itself
    ("no-such-command", "invalid choice"),
    ("sample --out {out}", "--model"),
]


def idx_floats(path, values: np.ndarray) -> None:
    """An IDX file of big-endian float32 values (type 0x0D), which elmgen must refuse rather than truncate."""
    header = bytes([0, 0, 0x0D, values.ndim]) + b"".join(struct.pack(">I", s) for s in values.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + values.astype(">f4").tobytes())


def images(root, classes: dict) -> str:
    """A class folder: {class name: [file names]}; "broken*" files hold junk bytes, the others a small image."""
    for cls, names in classes.items():
        (root / cls).mkdir(parents=True)
        for name in names:
            if name.startswith("broken"):
                (root / cls / name).write_bytes(b"not an image")
            else:
                Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(root / cls / name)
    return str(root)


def damaged_copy(src, dst, damage) -> str:
    shutil.copytree(src, dst)
    damage(dst)
    return str(dst)


def for_each(pattern: str, change):
    return lambda root: [change(f) for f in root.rglob(pattern)]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """Tiny runs (a 1-step tokenizer, code folder, AR and MLM models, classifier) and broken inputs."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    with pytest.MonkeyPatch.context() as mp:
        fmnist, floats = tmp / "fmnist", tmp / "float_labels"
        for root in (fmnist, floats):
            root.mkdir()
            for prefix, n in (("train", 40), ("t10k", 10)):
                write_idx(root / f"{prefix}-images-idx3-ubyte.gz", np.full((n, 28, 28), 50))
                write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
        idx_floats(floats / "train-labels-idx1-ubyte.gz", np.arange(40) % 10 + 0.5)
        mp.setenv("ELMGEN_FASHION_MNIST", str(fmnist))
        p = {name: str(tmp / name) for name in ("tok", "codes", "ar", "mlm", "clf")}
        steps = ["train.steps=1", "train.batch_size=4"]
        for argv in (
            ["train-tokenizer", "--out", p["tok"], "data.limit=16", *TOK, *steps],
            ["tokenize", "--tokenizer", p["tok"], "--out", p["codes"], "--limit", "20", "--vocab", "2-4"],
            ["train", "--codes", p["codes"], "--out", p["ar"], "--preset", "micro", *steps],
            ["train", "--codes", p["codes"], "--out", p["mlm"], "--preset", "micro", "--kind", "mlm", *steps],
            [
                "train-classifier",
                "--out",
                p["clf"],
                "classifier.widths=[8,16,32]",
                "classifier.feature_dim=16",
                "data.limit=32",
                *steps,
                "train.save_every=1",
            ],
        ):
            assert main(argv) == 0, argv
        p.update(tmp=str(tmp), file=str(tmp / "file.txt"), float_labels=str(floats))
        (tmp / "file.txt").write_text("a regular file\n")
        npz = {
            "npz_ok": [np.zeros((2, 32, 32, 1), np.uint8)],
            "npz_empty": [np.zeros((0, 32, 32, 1), np.uint8)],
            "npz_no_arr0": [],
            "npz_float": [np.zeros((2, 32, 32, 1), np.float32)],
            "npz_float_labels": [np.zeros((2, 32, 32, 1), np.uint8), np.array([0.5, 1.5])],
        }
        for name, arrays in npz.items():
            np.savez(tmp / f"{name}.npz", *arrays)
            p[name] = str(tmp / f"{name}.npz")
        np.savez(tmp / "npz_bad_stats.npz", mu=np.zeros(16), sigma=np.zeros(3))
        p["npz_bad_stats"] = str(tmp / "npz_bad_stats.npz")
        for name, text in (
            ("yaml_bad", "train: steps: 3\n"),
            ("yaml_list", "- train\n- steps\n"),
            ("yaml_number", "5\n"),
            ("yaml_empty", ""),
        ):
            (tmp / f"{name}.yaml").write_text(text)
            p[name] = str(tmp / f"{name}.yaml")
        p["images_broken"] = images(tmp / "images_broken", {"a": ["0.png"], "b": ["1.png", "broken.png"]})
        p["images_empty_class"] = images(tmp / "images_empty_class", {"a": ["0.png"], "b": []})
        p["lm_huge_header"] = damaged_copy(
            p["ar"],
            tmp / "lm_huge_header",
            for_each("*.safetensors", lambda f: f.write_bytes(struct.pack("<Q", 2**63) + f.read_bytes()[8:])),
        )
        p["lm_truncated"] = damaged_copy(
            p["ar"],
            tmp / "lm_truncated",
            for_each("*.safetensors", lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])),
        )
        p["lm_bad_config"] = damaged_copy(
            p["ar"], tmp / "lm_bad_config", for_each("config.json", lambda f: f.write_text("{not json"))
        )
        p["codes_truncated"] = damaged_copy(
            p["codes"],
            tmp / "codes_truncated",
            for_each("shard_*.npy", lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])),
        )
        p["codes_bad_meta"] = damaged_copy(
            p["codes"],
            tmp / "codes_bad_meta",
            for_each("meta.json", lambda f: f.write_text(json.dumps({**json.loads(f.read_text()), "grid": "eight"}))),
        )
        yield p


@pytest.mark.parametrize("row, expected", ROWS, ids=[row for row, _ in ROWS])
def test_bad_input_is_one_line(paths, row, expected, tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setenv("TQDM_DISABLE", "1")  # progress bars would be stderr lines besides the message
    argv = shlex.split(row.format(**paths, out=tmp_path / "out"))
    while argv[0].split("=")[0].isupper():
        monkeypatch.setenv(*argv.pop(0).split("=", 1))
    try:
        code = main(argv)
    except SystemExit as e:  # usage errors leave through argparse
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert code == 2 and len(lines) == 1 and lines[0].startswith("elmgen: error:"), (code, err)
    assert expected in lines[0], lines[0]


def test_check_data_lists_every_bad_file(paths, tmp_path, capsys):
    assert main(["check-data", paths["images_broken"], "--workers", "2"]) == 2
    out, err = capsys.readouterr()
    assert out == f"{paths['images_broken']}/b/broken.png: {out.split(': ', 1)[1]}" and "3 files checked, 1 bad" in err
    assert main(["check-data", images(tmp_path / "ok", {"a": ["0.png", "1.png"], "b": ["2.png"]})]) == 0
    assert capsys.readouterr().out == "3 files checked, 0 bad\n"


def test_the_ceiling_script_names_a_bad_path_in_one_line(tmp_path):
    script = Path(__file__).parents[1] / "scripts" / "reconstruction_ceiling.py"
    missing = str(tmp_path / "no-run")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), missing, missing], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "reconstruction_ceiling.py: error: no checkpoint found at" in done.stderr

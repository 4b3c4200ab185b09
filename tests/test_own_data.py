"""Your own images end to end: a class folder without a test split, through `elmgen run --data` and `sweep`."""

import json

import numpy as np
import pytest
import yaml
from PIL import Image

import elmgen.train.budget
from elmgen.cli import main
from elmgen.data import inspect_folder
from elmgen.data.shapes import PALETTE, SHAPES, make_shapes
from elmgen.errors import ElmgenError

# A run small enough for the test suite: the same pipeline, a fraction of its size.
TINY = [
    "tokenizer.tokenizer.base_width=8",
    "tokenizer.tokenizer.num_bits=8",
    "tokenizer.train.batch_size=8",
    "tokenizer.train.steps=4",
    "tokenizer.eval_images=12",
    "lm.model.vocab=2-4",
    "lm.model.n_layer=1",
    "lm.model.d_model=64",
    "lm.model.n_head=2",
    "lm.train.batch_size=8",
    "lm.train.steps=4",
    "classifier.train.batch_size=16",
    "classifier.train.steps=4",
    "num_per_class=2",
    "reference_images=30",
]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("data") / "shapes", num_classes=3, per_class=20, size=32)


def test_shapes_differ_by_shape_not_colour(tmp_path):
    root = make_shapes(tmp_path / "s", num_classes=6, per_class=3, size=24, seed=1)
    assert sorted(p.name for p in root.iterdir()) == sorted(SHAPES)
    first = {s: np.asarray(Image.open(root / s / "00000.png")) for s in SHAPES}
    assert all(a.shape == (24, 24, 3) for a in first.values())
    assert len({a.reshape(-1, 3)[0].tobytes() for a in first.values()}) > 1  # backgrounds are random
    again = make_shapes(tmp_path / "t", num_classes=6, per_class=3, size=24, seed=1)
    assert (again / "ring" / "00002.png").read_bytes() == (root / "ring" / "00002.png").read_bytes()
    with pytest.raises(ElmgenError, match="not empty"):
        make_shapes(root)


def test_palette_shapes_use_only_the_palette_colours(tmp_path, capsys):
    root = make_shapes(tmp_path / "p", num_classes=2, per_class=6, size=24, seed=3, palette=3)
    allowed = {tuple(c) for c in PALETTE[:3]}
    for png in root.glob("*/*.png"):
        pixels = np.asarray(Image.open(png)).reshape(-1, 3)
        colours, counts = np.unique(pixels, axis=0, return_counts=True)
        pure = {tuple(c) for c in colours} & allowed
        assert len(pure) == 2  # a background and a shape, two distinct palette colours
        share = counts[[tuple(c) in allowed for c in colours]].sum() / len(pixels)
        assert share > 0.8, (png, share)  # the rest are the antialiased edges between the two
    assert main(["shapes", "--out", str(tmp_path / "bad"), "--palette", "9"]) == 2
    assert "--palette must be 0 (any colour) or in 2..8" in capsys.readouterr().err


def test_jitter_zero_poses_every_shape_alike(tmp_path, capsys):
    def masks(root):  # where each image differs from its corner (background) colour
        images = [np.asarray(Image.open(p)) for p in sorted(root.glob("cross/*.png"))]
        return [(a != a[0, 0]).any(-1) for a in images]

    fixed = masks(make_shapes(tmp_path / "j0", num_classes=4, per_class=5, size=24, jitter=0, palette=8))
    assert all((m == fixed[0]).all() for m in fixed)  # colours vary, the shape's pixels never move
    posed = masks(make_shapes(tmp_path / "j1", num_classes=4, per_class=5, size=24, palette=8))
    assert not all((m == posed[0]).all() for m in posed)
    assert main(["shapes", "--out", str(tmp_path / "bad"), "--jitter", "1.5"]) == 2
    assert "--jitter must be in 0..1" in capsys.readouterr().err


def test_inspect_folder_detects_channels_and_size(shapes, tmp_path):
    assert inspect_folder(shapes) == (3, 32)
    grey = tmp_path / "grey" / "a"
    grey.mkdir(parents=True)
    for i in range(3):  # grey pictures saved as RGB are grey; 100 px supports 64 px
        Image.new("RGB", (100, 120), (i * 40,) * 3).save(grey / f"{i}.png")
    assert inspect_folder(grey.parent) == (1, 64)


@pytest.mark.slow
def test_run_on_a_class_folder_takes_everything_from_the_data(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--data", str(shapes), "--out", str(out), *TINY]) == 0
    err = capsys.readouterr().err
    assert "colour images at 32 px (detected), a 8x8 grid of codes" in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval"]["num_samples"] == 6  # 3 classes from the folder, 2 samples each
    per_sample = json.loads((out / "per_sample.json").read_text())  # what a sweep pairs runs by
    assert len(per_sample["seed"]) == len(set(per_sample["seed"])) == 6 and per_sample["label"] == [0, 0, 1, 1, 2, 2]
    assert np.mean(per_sample["class_accuracy"]) == pytest.approx(metrics["eval"]["class_accuracy"])
    codes = json.loads((out / "codes" / "meta.json").read_text())
    assert codes["num_classes"] == 3 and codes["class_names"] == ["circle", "square", "triangle"]
    assert codes["images"] == 54  # 20 a class, 2 of each held out
    assert codes["flip"] and codes["draws"] == 0 and codes["count"] == 54 * 8  # the folder runs' views: flip x 4 shifts
    assert (codes["crops"], codes["num_crops"], codes["crop_range"]) == ("shift", 4, 1.125)
    tok = json.loads((out / "tokenizer" / "eval.json").read_text())
    assert "held-out part: 10% of each class held out" in tok["dataset"] and tok["images"] == 6
    assert len(tok["psnr_per_class"]) == 3 and None not in tok["psnr_per_class"]
    ceiling = metrics["eval"]["reconstructions"]  # the tokenizer's held-out reconstructions, scored as samples
    assert ceiling["num_samples"] == 6 and 0 <= ceiling["class_accuracy"] <= 1 and ceiling["fid"] >= 0
    report = (out / "report.md").read_text()
    assert "reconstructions of 6 held-out images" in report and f"| {ceiling['fid']:.2f} |" in report
    assert report.startswith("# elmgen: shapes/ (your images)") and "Fashion-MNIST" not in report
    assert "10% of each class" in report and "| triangle |" in report
    assert (
        "on the codes of 4 copies, shifted by up to 1/16 of the side each way, of each training image and its mirror"
        in report
    )
    assert (metrics["sampling"]["guidance_scale"], metrics["sampling"]["top_k"]) == (5, 5)  # the folder runs' sampling
    assert np.load(out / "samples.npz")["arr_0"].shape == (6, 32, 32, 3)
    tokenizer_config = json.loads(next((out / "tokenizer" / "checkpoints").glob("step_*/config.json")).read_text())
    assert tokenizer_config["data"]["source"] == str(shapes.resolve())  # resolves from any working folder
    tokenizer_job = yaml.safe_load((out / "tokenizer" / "job.yaml").read_text())  # the folder recipe
    assert tokenizer_job["loss"]["edge_weight"] == 4 and tokenizer_job["tokenizer"]["binarization"] == "deterministic"


def test_a_config_that_contradicts_the_data_names_the_setting(shapes, tmp_path, capsys):
    assert main(["demo", "--data", str(shapes), "--out", str(tmp_path / "r"), *TINY, "lm.model.num_classes=10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "lm.model.num_classes=10 is set in the config, but the data gives classes: 3" in err
    assert "drop lm.model.num_classes" in err


@pytest.mark.slow
def test_sweep_on_a_folder_needs_no_class_or_grid_overrides(shapes, tmp_path, capsys):
    sweep = tmp_path / "sweep.yaml"
    base = "\n".join(
        f"  {line}"
        for line in [
            f"tokenizer: {{data: {{source: {shapes}}}, tokenizer: {{base_width: 8, num_bits: 8}},",
            "            train: {steps: 2, batch_size: 8}, eval_images: 6}",
            "lm: {model: {n_layer: 1, d_model: 64, n_head: 2, vocab: 2-4}, train: {steps: 2, batch_size: 8}}",
            "num_per_class: 1",
            "evaluate: false",
        ]
    )
    sweep.write_text(f"base:\n{base}\ngrid:\n  sample.guidance_scale: [1.0, 2.0]\n")
    assert main(["sweep", str(sweep), "--out", str(tmp_path / "sw")]) == 0
    rows = (tmp_path / "sw" / "summary.csv").read_text().strip().splitlines()
    assert len(rows) == 3
    # the colour folder is seen in colour, as `run --data` sees it, though the sweep file names no channels
    assert "colour images at 32 px" in capsys.readouterr().err
    (job,) = (tmp_path / "sw" / "stages" / "tokenizers").glob("*/job.yaml")  # the classifier's data is the tokenizer's
    tokenizer_job = yaml.safe_load(job.read_text())
    assert tokenizer_job["data"]["channels"] == 3 and tokenizer_job["loss"]["edge_weight"] == 4  # as `run --data`
    assert tokenizer_job["tokenizer"]["binarization"] == "deterministic"


@pytest.mark.slow
def test_minutes_fits_each_training_stage_to_the_budget_and_a_rerun_keeps_it(shapes, tmp_path, capsys, monkeypatch):
    # A training clock on which every reading is 100 s later (the budget reads it once a step while it times them):
    # each stage's pace is 100 s a step and its first 6 steps overrun a 0.1-minute budget, so each does one more
    # (a count that does not depend on this machine)
    readings = iter(range(0, 10**6, 100))
    monkeypatch.setattr(elmgen.train.budget, "clock", lambda device: next(readings))
    out = tmp_path / "run"
    assert main(["run", "--data", str(shapes), "--out", str(out), "--minutes", "0.1", *TINY]) == 0
    err = capsys.readouterr().err
    assert err.count("100 s a step, so 7 steps fit the") == 3  # tokenizer, LM and classifier each said so
    decided = {}
    for stage in ("tokenizer", "lm", "classifier"):
        config = json.loads(next((out / stage / "checkpoints").glob("step_*/config.json")).read_text())
        assert config["step"] == config["total_steps"] == 7  # decided after 6 steps, not the configured 4
        decided[stage] = config["total_steps"]
    assert json.loads((out / "metrics.json").read_text())["budget"]["steps"] == decided
    report = (out / "report.md").read_text()
    assert "budget of 0.1 minutes (`--minutes`)" in report and f"lm {decided['lm']}," in report
    assert main(["run", "--data", str(shapes), "--out", str(out), "--minutes", "0.1", *TINY]) == 0
    assert "steps fit the" not in capsys.readouterr().err  # every stage is complete: nothing trains again
    assert main(["run", "--data", str(shapes), "--out", str(out), "minutes=-1"]) == 2
    assert "minutes=-1.0 is out of range" in capsys.readouterr().err

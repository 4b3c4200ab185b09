import csv
import json

import numpy as np
import pytest

import elmgen.pipeline.stages
from elmgen.cli import main
from elmgen.config import build_config
from elmgen.errors import ElmgenError
from elmgen.pipeline import SweepConfig, apply_overrides, expand, fit_to_codes, shared_dirs
from elmgen.pipeline.sweep import replicate_runs, run_sweep
from elmgen.stats import mean_interval

SWEEP = """
base:
  tokenizer:
    data: {limit: 40}
    tokenizer: {base_width: 16, num_bits: 8, channel_mult: [1, 2, 2]}
    train: {steps: 2, batch_size: 8, save_every: 2}
    eval_images: 10
  lm:
    model: {n_layer: 1, d_model: 64, n_head: 2, vocab: 2-4}
    train: {steps: 2, batch_size: 4, save_every: 2}
  num_per_class: 1
  evaluate: false
grid:
  lm.model.vocab: [2-4, 4-2]
  sample.guidance_scale: [1.0, 2.0]
"""


def test_expand_grid_and_runs():
    cfg = SweepConfig(grid={"a.b": [1, 2], "c": ["x"]}, runs=[{"k": 0}, {"k": 1}])
    assert expand(cfg) == [
        {"k": 0, "a.b": 1, "c": "x"},
        {"k": 0, "a.b": 2, "c": "x"},
        {"k": 1, "a.b": 1, "c": "x"},
        {"k": 1, "a.b": 2, "c": "x"},
    ]
    with pytest.raises(ElmgenError, match="does not exist"):
        apply_overrides(SweepConfig().base, {"lm.model.layers": 3})


def stage_dirs(cfg, runs, tmp_path):
    return [shared_dirs(apply_overrides(cfg.base, run.overrides), tmp_path, tmp_path) for run in runs]


def test_replicates_reseed_what_the_sweep_varies_and_share_the_rest(tmp_path):
    sampling = SweepConfig(grid={"sample.temperature": [1.0, 0.5]}, replicates=3)
    runs = replicate_runs(sampling)
    assert [(run.setting["sample.temperature"], run.replicate) for run in runs] == [
        (1.0, 0),
        (0.5, 0),
        (1.0, 1),
        (0.5, 1),
        (1.0, 2),
        (0.5, 2),
    ]
    assert runs[0].overrides == {"sample.temperature": 1.0}  # replicate 0 is the setting: old runs are reused
    assert runs[5].overrides == {"sample.temperature": 0.5, "sample.seed": 2}
    assert len({run.name for run in runs}) == 6
    dirs = stage_dirs(sampling, runs, tmp_path)
    assert len({(d.tokenizer, d.lm, d.classifier) for d in dirs}) == 1  # every replicate reuses the one model

    lm = SweepConfig(grid={"lm.model.vocab": ["2-8", "4-4"]}, replicates=2)
    runs = replicate_runs(lm)
    assert runs[3].overrides == {"lm.model.vocab": "4-4", "lm.train.seed": 1, "sample.seed": 1}
    dirs = stage_dirs(lm, runs, tmp_path)
    assert len({d.tokenizer for d in dirs}) == 1 and len({d.lm for d in dirs}) == 4

    lm.reseed = ["sample"]  # training replicated less: the LM's seed stays, each vocabulary trains once
    assert len({d.lm for d in stage_dirs(lm, replicate_runs(lm), tmp_path)}) == 2
    lm.reseed = ["tokenizer"]
    assert len({d.tokenizer for d in stage_dirs(lm, replicate_runs(lm), tmp_path)}) == 2
    lm.reseed = ["lr"]
    with pytest.raises(ElmgenError, match="reseed"):
        replicate_runs(lm)
    with pytest.raises(ElmgenError, match="varies sample.seed"):
        replicate_runs(SweepConfig(grid={"sample.seed": [0, 1]}, replicates=2))
    with pytest.raises(ElmgenError, match="at least 1"):
        replicate_runs(SweepConfig(replicates=0))


def fake_results(cfg, out, rng):
    """metrics.json and per-sample scores of every run, as a pipeline would write them, with built-in answers:
    setting 1 has an FID 2 higher and a class confidence 0.05 higher than setting 0 under noise shared by the
    replicate's seed; recall and class accuracy are the same in both."""
    seed_noise = [-3.0, 3.0, -2.0, 2.0]  # larger than the difference
    image_noise = rng.uniform(0, 0.5, size=(10, 50))
    correct = rng.integers(0, 2, size=(10, 50)).astype(float)
    for run in replicate_runs(cfg):
        s, r = run.setting["sample.temperature"] == 0.5, run.replicate
        metrics = {
            "tokenizer": {"psnr": 20.0},
            "lm": {"params": 12345, "final_loss": 3.0},
            "eval": {
                "fid": 10 + 2 * s + seed_noise[r] + rng.normal(0, 0.1),
                "recall": 0.5 + seed_noise[r] / 10 + (0.01 if r % 2 == s else -0.01),
            },
        }
        confidence = image_noise[r] + 0.05 * s + rng.normal(0, 0.01, size=50)
        metrics["eval"].update(class_accuracy=correct[r].mean(), class_confidence=confidence.mean())
        per_sample = {"seed": list(range(1000 * r, 1000 * r + 50)), "label": [0] * 50}
        per_sample.update(class_accuracy=correct[r].tolist(), class_confidence=confidence.tolist())
        run_dir = out / "runs" / run.name
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
        (run_dir / "per_sample.json").write_text(json.dumps(per_sample))


def test_summary_intervals_and_significance_on_known_differences(tmp_path):
    cfg = SweepConfig(grid={"sample.temperature": [1.0, 0.5]}, replicates=4)
    out = tmp_path / "sweep"
    fake_results(cfg, out, np.random.default_rng(0))
    rows = run_sweep(cfg, out)  # every run is finished: nothing trains
    assert len(rows) == 8 and [row["replicate"] for row in rows] == [0, 0, 1, 1, 2, 2, 3, 3]
    with open(out / "summary.csv") as f:
        a, b = list(csv.DictReader(f))
    assert (a["sample.temperature"], b["sample.temperature"], a["replicates"]) == ("1.0", "0.5", "4")
    fids = [row["fid"] for row in rows if row["sample.temperature"] == 0.5]
    mean, half = mean_interval(fids)
    assert float(b["fid"]) == pytest.approx(mean, rel=1e-3) and float(b["fid_ci"]) == pytest.approx(half, rel=1e-2)
    assert float(b["fid_ci"]) > 2  # the seed's noise makes each setting's interval wider than the difference ...
    assert a["fid_vs_best"] == "0.0" and b["fid_significant"] == "True"  # ... and cancels in the paired difference
    assert float(b["fid_vs_best"]) == pytest.approx(2, abs=0.3)
    assert b["class_confidence_significant"] == "" and a["class_confidence_significant"] == "True"
    assert float(a["class_confidence_vs_best"]) == pytest.approx(-0.05, abs=0.01)
    assert b["recall_significant"] == "False" or a["recall_significant"] == "False"  # no difference built in
    assert "True" not in (a["class_accuracy_significant"], b["class_accuracy_significant"])
    assert float(a["params"]) == 12345 and a["psnr_significant"] == b["psnr_significant"] == ""  # nothing replicated

    md = (out / "summary.md").read_text()
    assert "| **" in md and " *" in md and " ~" in md
    assert "- fid: paired t over 4 replicates" in md and "- class_confidence: paired bootstrap over 200 samples" in md
    assert (out / "plot_sample_temperature.png").is_file() and len((out / "runs.csv").read_text().splitlines()) == 9
    with open(out / "differences.csv") as f:
        differences = {d["metric"]: d for d in csv.DictReader(f)}  # the two settings: one pair per metric
    fid = differences["fid"]
    assert (fid["a"], fid["b"], fid["significant"]) == (a["run"], b["run"], "True")
    assert 0 < float(fid["low"]) < 2 < float(fid["high"]) and fid["test"] == "paired t over 4 replicates"
    assert differences["recall"]["significant"] == "False" and float(differences["recall"]["low"]) < 0
    assert differences["psnr"]["significant"] == "" and "params" not in differences


def test_group_by_marks_each_setting_against_the_best_of_its_group(tmp_path):
    """Built in: the wide model's FID is 20 lower whatever the temperature; within each width, temperature 0.5
    costs 2 (under seed noise shared by the replicate). Without group_by every narrow setting is far from the
    best; grouped by width, each width has its own best and the cooled setting is the significant one."""
    cfg = SweepConfig(grid={"lm.model.d_model": [64, 128], "sample.temperature": [1.0, 0.5]}, replicates=3)
    out, rng = tmp_path / "sweep", np.random.default_rng(0)
    for run in replicate_runs(cfg):
        wide, cool = run.setting["lm.model.d_model"] == 128, run.setting["sample.temperature"] == 0.5
        fid = 30 - 20 * wide + 2 * cool + [-3.0, 3.0, 0.0][run.replicate] + rng.normal(0, 0.1)
        (out / "runs" / run.name).mkdir(parents=True)
        (out / "runs" / run.name / "metrics.json").write_text(json.dumps({"eval": {"fid": fid}}))

    def marks():
        run_sweep(cfg, out)
        with open(out / "summary.csv") as f:
            return {(r["lm.model.d_model"], r["sample.temperature"]): r for r in csv.DictReader(f)}

    flat = marks()
    assert float(flat["64", "1.0"]["fid_vs_best"]) == pytest.approx(20, abs=0.5)
    cfg.group_by = ["lm.model.d_model"]
    grouped = marks()
    for width in ("64", "128"):
        assert grouped[width, "1.0"]["fid_vs_best"] == "0.0" and grouped[width, "1.0"]["fid_significant"] == ""
        assert float(grouped[width, "0.5"]["fid_vs_best"]) == pytest.approx(2, abs=0.5)
        assert grouped[width, "0.5"]["fid_significant"] == "True"
    assert "the best setting of each lm.model.d_model" in (out / "summary.md").read_text()
    cfg.group_by = ["sample.top_k"]
    with pytest.raises(ElmgenError, match="group_by names sample.top_k"):
        run_sweep(cfg, out)


@pytest.mark.slow
def test_sweep_shares_stages_skips_done_runs_and_resumes(fake_fmnist, tmp_path, monkeypatch, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP)
    assert len(expand(build_config(SweepConfig, path))) == 4
    calls = {"train_lm": 0, "sample_images": 0}
    for name in calls:
        real = getattr(elmgen.pipeline.stages, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            if _name == "sample_images" and calls[_name] == 3 and not calls.get("crashed"):
                calls["crashed"] = True
                raise KeyboardInterrupt  # killed during the third run
            return _real(*args, **kwargs)

        monkeypatch.setattr(elmgen.pipeline.stages, name, counted)
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out)]) == 130
    assert calls == {"train_lm": 2, "sample_images": 3, "crashed": True}

    calls.update(train_lm=0, sample_images=0)
    assert main(["sweep", str(path), "--out", str(out)]) == 0
    assert calls["train_lm"] == 0 and calls["sample_images"] == 2  # only runs 3 and 4 were missing
    stages = out / "stages"
    assert len(list((stages / "tokenizers").iterdir())) == 1 and len(list((stages / "lms").iterdir())) == 2
    summary = (out / "summary.csv").read_text().splitlines()
    assert len(summary) == 5 and summary[0].startswith("run,lm.model.vocab,sample.guidance_scale")
    assert (out / "summary.md").is_file()
    assert (out / "plot_lm_model_vocab.png").is_file() and (out / "plot_sample_guidance_scale.png").is_file()

    calls.update(train_lm=0, sample_images=0)
    assert main(["sweep", str(path), "--out", str(out)]) == 0  # finished: no work at all
    assert calls["train_lm"] == 0 and calls["sample_images"] == 0
    rows = [json.loads((p / "metrics.json").read_text()) for p in sorted((out / "runs").iterdir())]
    assert sorted((r["lm"]["vocab"], r["sampling"]["guidance_scale"]) for r in rows) == [
        ("2-4", 1.0),
        ("2-4", 2.0),
        ("4-2", 1.0),
        ("4-2", 2.0),
    ]

    calls.update(train_lm=0, sample_images=0)  # a second replicate: the swept LM is retrained with another seed
    assert main(["sweep", str(path), "--out", str(out), "--replicates", "2"]) == 0
    assert calls["train_lm"] == 2 and calls["sample_images"] == 4  # replicate 0 is the finished sweep
    assert len(list((stages / "tokenizers").iterdir())) == 1 and len(list((stages / "lms").iterdir())) == 4
    with open(out / "summary.csv") as f:
        settings = list(csv.DictReader(f))
    assert len(settings) == 4 and {s["replicates"] for s in settings} == {"2"}
    assert {"final_loss", "final_loss_ci", "final_loss_vs_best", "final_loss_significant"} <= set(settings[0])
    assert float(settings[0]["final_loss_ci"]) > 0  # two LM seeds
    assert len((out / "runs.csv").read_text().splitlines()) == 9
    with pytest.raises(SystemExit):
        main(["sweep", str(path), "--out", str(out), "--replicates", "0"])
    assert "--replicates: must be at least 1" in capsys.readouterr().err


@pytest.mark.slow
def test_shipped_sweeps_load_and_expand():
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parent.parent / "configs" / "sweeps").glob("*.yaml"))
    assert len(files) == 11
    for path in files:
        cfg = build_config(SweepConfig, path)
        runs = expand(cfg)
        assert len(runs) >= 2, path.name
        for overrides in runs:
            fmnist = {"grid": 8, "num_classes": 10, "dataset": "fashion-mnist"}  # what the sweeps' codes hold
            fit_to_codes(apply_overrides(cfg.base, overrides).lm, fmnist).model.validate()

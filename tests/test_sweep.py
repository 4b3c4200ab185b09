import json

import pytest

import elmgen.pipeline.stages
from elmgen.cli import main
from elmgen.config import build_config
from elmgen.errors import ElmgenError
from elmgen.pipeline import SweepConfig, apply_overrides, expand, fit_to_codes

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


@pytest.mark.slow
def test_shipped_sweeps_load_and_expand():
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parent.parent / "configs" / "sweeps").glob("*.yaml"))
    assert len(files) == 7
    for path in files:
        cfg = build_config(SweepConfig, path)
        runs = expand(cfg)
        assert len(runs) >= 2, path.name
        for overrides in runs:
            fmnist = {"grid": 8, "num_classes": 10, "dataset": "fashion-mnist"}  # what the sweeps' codes hold
            fit_to_codes(apply_overrides(cfg.base, overrides).lm, fmnist).model.validate()

from pathlib import Path

import pytest

from elmgen.config import build_config, from_dict, save_yaml, to_dict
from elmgen.errors import ElmgenError
from elmgen.models import PRESETS
from elmgen.pipeline import PipelineConfig, SweepConfig
from elmgen.train import LMJob, TokenizerJob

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
KINDS = {"tokenizer": TokenizerJob, "lm": LMJob, "demo": PipelineConfig}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cls = KINDS[path.stem.split("-")[0]]
    assert isinstance(build_config(cls, path), cls)


def test_configs_exist():
    assert {p.stem.split("-")[0] for p in CONFIGS.glob("*.yaml")} == set(KINDS)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("train:\n  steps: 7\ntokenizer:\n  num_bits: 12\n")
    job = build_config(TokenizerJob, path, ["train.steps=9", "tokenizer.channel_mult=[1,2]"])
    assert (job.train.steps, job.tokenizer.num_bits, job.tokenizer.channel_mult) == (9, 12, [1, 2])
    with pytest.raises(ElmgenError, match="invalid config"):
        build_config(TokenizerJob, None, ["train.steps=many"])


def test_dict_and_yaml_round_trip(tmp_path):
    job = build_config(LMJob, None, ["model.n_layer=3"])
    assert from_dict(LMJob, to_dict(job)) == job
    save_yaml(job, tmp_path / "j.yaml")
    assert build_config(LMJob, tmp_path / "j.yaml") == job


def test_demo_yaml_states_the_demo_defaults():
    assert build_config(PipelineConfig, CONFIGS / "demo.yaml") == PipelineConfig()


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("lm-*.yaml")), ids=lambda p: p.name)
def test_lm_configs_agree_with_their_preset(path):
    """configs/lm-<...>-NAME.yaml restates the size of preset NAME for its readers; the presets are the source."""
    model = build_config(LMJob, path).model
    size = PRESETS[path.stem.split("-")[-1]]
    assert {k: getattr(model, k) for k in size} == size


def test_configs_with_the_old_guidance_names_still_load(tmp_path):
    """Before the rename, guidance fields were cfg_*: files, saved configs, overrides and sweeps that use those names
    read as guidance_*."""
    path = tmp_path / "old.yaml"
    path.write_text("sample:\n  cfg_scale: 2.0\n  cfg_interval: [0.1, 0.9]\n")
    cfg = build_config(PipelineConfig, path, ["sample.cfg_schedule=constant", "sample.cfg_power=3"])
    assert (cfg.sample.guidance_scale, cfg.sample.guidance_interval) == (2.0, [0.1, 0.9])
    assert (cfg.sample.guidance_schedule, cfg.sample.guidance_power) == ("constant", 3.0)
    saved = to_dict(PipelineConfig())
    saved["sample"] = {k.replace("guidance_", "cfg_"): v for k, v in saved["sample"].items()}
    assert "cfg_scale" in saved["sample"] and from_dict(PipelineConfig, saved) == PipelineConfig()
    path.write_text("grid:\n  sample.cfg_scale: [1.0, 2.0]\nruns:\n  - {sample.cfg_schedule: constant}\n")
    sweep = build_config(SweepConfig, path, ["base.sample.cfg_power=3"])
    assert sweep.grid == {"sample.guidance_scale": [1.0, 2.0]}
    assert sweep.runs == [{"sample.guidance_schedule": "constant"}]
    assert sweep.base.sample.guidance_power == 3.0

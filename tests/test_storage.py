"""What elmgen reads and writes on disk: no checkpoint runs code, a crash leaves nothing stale behind and
loses at most the steps since the last checkpoint, a refused run touches nothing, a bad file or setting
is one clear line."""

import json
import math
import os
import struct
from pathlib import Path

import pytest
import torch

import elmgen.checkpoint
import elmgen.io
import elmgen.pipeline.stages
from elmgen import checkpoint
from elmgen.checkpoint import CheckpointMeta
from elmgen.config import build_config
from elmgen.data import DataConfig
from elmgen.device import resolve_device
from elmgen.errors import ElmgenError
from elmgen.io import read_metrics
from elmgen.models import ClassifierConfig
from elmgen.pipeline import PipelineConfig, run_pipeline, shared_dirs
from elmgen.train import ClassifierJob, TrainConfig, fit, train_classifier


def linear_fit(run, steps, resume=False, crash_at=None, **train):
    """The real training loop on a 3-parameter model; `crash_at`: the step whose batch raises KeyboardInterrupt."""

    def step_fn(model, step, idx):
        if step == crash_at:
            raise KeyboardInterrupt
        return model(torch.ones(len(idx), 2)).pow(2).mean(), {}

    cfg = TrainConfig(**{"steps": steps, "batch_size": 2, "log_every": 1, "save_every": 2, **train})
    return fit(torch.nn.Linear(2, 1), cfg, run, step_fn, num_items=8, meta=CheckpointMeta(kind="x"), resume=resume)


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


class Payload:
    """Unpickling it creates `path`: what a trainer.pt planted in a run folder could do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_planted_pickle_is_refused_never_run(tmp_path):
    linear_fit(tmp_path / "run", 2)
    f = checkpoint.resolve(tmp_path / "run") / checkpoint.TRAINER
    marker = tmp_path / "pwned"
    torch.save({**torch.load(f, weights_only=True), "extra": Payload(marker)}, f)
    with pytest.raises(ElmgenError, match="not a plain elmgen trainer state") as e:
        linear_fit(tmp_path / "run", 4, resume=True)
    assert str(f) in one_line_error(e) and "without --resume" in str(e.value)
    with pytest.raises(ElmgenError, match="will not be loaded"):
        checkpoint.load_trainer_state(tmp_path / "run")
    assert not marker.exists()
    f.write_bytes(f.read_bytes()[:100])  # truncated: the same clear refusal
    with pytest.raises(ElmgenError, match="not a plain elmgen trainer state"):
        linear_fit(tmp_path / "run", 4, resume=True)


def small_classifier(steps: int, **classifier) -> ClassifierJob:
    return ClassifierJob(
        data=DataConfig(limit=32),
        classifier=ClassifierConfig(**{"widths": [4, 8], "feature_dim": 8, **classifier}),
        train=TrainConfig(steps=steps, batch_size=8, lr=3e-3, log_every=1, save_every=2),
    )


def test_a_refused_run_leaves_job_yaml_alone_and_a_good_one_resumes(fake_fmnist, tmp_path, one_thread):
    run = tmp_path / "clf"
    train_classifier(small_classifier(2), run)
    job_yaml = (run / "job.yaml").read_text()
    refused = [
        ("--resume", small_classifier(3), False),  # an existing run without --resume
        ("does not match", small_classifier(3, feature_dim=16), True),  # another model
        ("train.lr=-1", replace_train(small_classifier(3), lr=-1.0), True),
    ]
    for message, job, resume in refused:
        with pytest.raises(ElmgenError, match=message):
            train_classifier(job, run, resume=resume)
        assert (run / "job.yaml").read_text() == job_yaml, message
    # the classifier's trainer state loads as plain data: the run resumes
    train_classifier(small_classifier(3), run, resume=True)
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]
    assert "steps: 3" in (run / "job.yaml").read_text()


def replace_train(job, **train):
    for k, v in train.items():
        setattr(job.train, k, v)
    return job


PIPELINE = """
tokenizer:
  data: {limit: 40}
  tokenizer: {base_width: 16, num_bits: 8, channel_mult: [1, 2, 2]}
  train: {steps: 2, batch_size: 8, save_every: 2}
  eval_images: 10
lm:
  model: {kind: mlm, n_layer: 1, d_model: 64, n_head: 2, vocab: 2-4}
  train: {steps: 4, batch_size: 4, save_every: 2, log_every: 1}
num_per_class: 1
evaluate: false
sample: {steps: 2}
"""


@pytest.mark.slow
def test_a_kill_during_the_last_lm_checkpoint_is_finished_not_skipped(fake_fmnist, tmp_path, monkeypatch, one_thread):
    (tmp_path / "p.yaml").write_text(PIPELINE)
    cfg = build_config(PipelineConfig, tmp_path / "p.yaml")
    dirs = shared_dirs(cfg, tmp_path / "stages", tmp_path / "samples")
    real_save = checkpoint.save_checkpoint

    def killed_at_the_last_lm_checkpoint(run_dir, step, *args, **kwargs):
        if Path(run_dir) == dirs.lm and step == 4:
            raise KeyboardInterrupt
        return real_save(run_dir, step, *args, **kwargs)

    monkeypatch.setattr(elmgen.checkpoint, "save_checkpoint", killed_at_the_last_lm_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, dirs)
    assert read_metrics(dirs.lm / "metrics.jsonl")[-1]["step"] == 4  # the log is complete, the model is not
    assert checkpoint.load_config(dirs.lm)["step"] == 2
    monkeypatch.setattr(elmgen.checkpoint, "save_checkpoint", real_save)
    calls = []
    real_train_lm = elmgen.pipeline.stages.train_lm
    monkeypatch.setattr(elmgen.pipeline.stages, "train_lm", lambda *a, **k: calls.append(k) or real_train_lm(*a, **k))
    metrics = run_pipeline(cfg, dirs)
    assert calls == [{"resume": True}]  # the MLM trainer state resumes as plain data
    assert checkpoint.load_config(dirs.lm)["step"] == 4 and metrics["lm"]["steps"] == 4
    assert [r["step"] for r in read_metrics(dirs.lm / "metrics.jsonl")] == [1, 2, 3, 4]


def test_stale_temporaries_go_on_start_and_a_full_disk_leaves_none(tmp_path, monkeypatch):
    run = tmp_path / "run"
    linear_fit(run, 2)
    ckpts = run / "checkpoints"
    (ckpts / ".tmp_abc123").mkdir()
    (ckpts / ".tmp_abc123" / checkpoint.WEIGHTS).write_bytes(b"0" * 1000)  # a kill during a save
    (ckpts / ".tmp_latest.x1y2").write_text("step_")  # ... during the `latest` update
    (run / ".tmp_metrics.jsonl.z9").write_text("")
    (run / ".tmp_mine").write_text("a user's file elmgen did not write")
    linear_fit(run, 4, resume=True)
    assert not list(ckpts.glob(".tmp_*")) and not (run / ".tmp_metrics.jsonl.z9").exists()
    assert (run / ".tmp_mine").is_file()

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(elmgen.checkpoint.torch, "save", no_space)
    with pytest.raises(OSError):
        linear_fit(run, 6, resume=True)
    monkeypatch.undo()
    assert not list(ckpts.glob(".tmp_*")) and checkpoint.load_config(run)["step"] == 4
    linear_fit(run, 6, resume=True)
    assert checkpoint.load_config(run)["step"] == 6


def test_old_checkpoints_are_pruned_before_a_new_one_is_written(tmp_path, monkeypatch):
    on_disk = []
    real_save_file = elmgen.checkpoint.save_file

    def counting(tensors, path, *args):
        if path.name == checkpoint.WEIGHTS:
            on_disk.append(len(list(path.parent.parent.glob("step_*"))))
        return real_save_file(tensors, path, *args)

    monkeypatch.setattr(elmgen.checkpoint, "save_file", counting)
    for keep in (2, 3):
        on_disk.clear()
        for step in range(1, 6):
            checkpoint.save_checkpoint(
                tmp_path / str(keep), step, torch.nn.Linear(2, 2), CheckpointMeta(kind="x"), keep=keep
            )
        # with the one being written, never more than `keep` checkpoints
        assert max(on_disk) == keep - 1
        names = sorted(p.name for p in (tmp_path / str(keep) / "checkpoints").iterdir())
        assert names == ["latest"] + [f"step_{s:08d}" for s in range(6 - keep, 6)]
    on_disk.clear()
    for step in (1, 2):  # keep=1: the latest stays until its successor is published
        checkpoint.save_checkpoint(tmp_path / "1", step, torch.nn.Linear(2, 2), CheckpointMeta(kind="x"), keep=1)
    assert on_disk == [0, 1] and checkpoint.resolve(tmp_path / "1").name == "step_00000002"


def test_what_a_checkpoint_publishes_is_on_disk_first(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    model = torch.nn.Linear(2, 2)
    checkpoint.save_checkpoint(tmp_path, 1, model, CheckpointMeta(kind="x"), {"step": 1}, ema=model.state_dict())
    assert {checkpoint.WEIGHTS, checkpoint.EMA, checkpoint.CONFIG, checkpoint.TRAINER, "checkpoints"} <= set(synced)
    assert any(name.startswith(".tmp_latest.") for name in synced)


def test_metrics_survive_a_kill_before_the_first_checkpoint_and_a_torn_last_line(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        linear_fit(run, 6, crash_at=3, save_every=10)  # killed after 3 logged steps, no checkpoint
    assert len(read_metrics(run / "metrics.jsonl")) == 3
    assert [r["step"] for r in linear_fit(run, 4, save_every=10)] == [1, 2, 3, 4]  # started again: no duplicates

    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 5, "lo')  # a kill mid-append
    assert [r["step"] for r in read_metrics(metrics)] == [1, 2, 3, 4]
    assert [r["step"] for r in linear_fit(run, 6, resume=True)] == [1, 2, 3, 4, 5, 6]
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:2] + ["garbage"] + lines[2:]) + "\n")
    with pytest.raises(ElmgenError, match="line 3") as e:
        read_metrics(metrics)
    assert str(metrics) in one_line_error(e)


@pytest.mark.parametrize(
    "field, value",
    [
        ("lr", -1.0),
        ("lr", math.nan),
        ("save_every", 0),
        ("log_every", 0),
        ("steps", 0),
        ("batch_size", 0),
        ("grad_accum", 0),
        ("ema_decay", 1.0),
        ("ema_decay", -0.1),
        ("warmup_steps", -1),
        ("min_lr", math.nan),
        ("weight_decay", -1.0),
        ("beta2", 1.0),
        ("grad_clip", math.inf),
        ("seed", -1),
        ("keep_checkpoints", 0),
    ],
)
def test_out_of_range_training_settings_are_one_line(field, value, tmp_path):
    with pytest.raises(ElmgenError, match=f"train.{field}={value}.* must be") as e:
        linear_fit(tmp_path / "run", **{"steps": 2, field: value})
    one_line_error(e)
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_an_unavailable_device_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for name, message in (
        ("cuda", "CUDA is not available"),
        ("cuda:1", "CUDA is not available"),
        ("mps", "MPS is not available"),
        ("tpu", "unknown device"),
    ):
        with pytest.raises(ElmgenError, match=message) as e:
            resolve_device(name)
        assert "--device cpu" in one_line_error(e) or "use auto" in str(e.value)
    assert resolve_device("cpu") == torch.device("cpu")


def safetensors_header(header: dict, payload: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + payload


@pytest.mark.parametrize("corrupt", ["huge header", "offsets past the end", "truncated", "empty"])
def test_a_malformed_weights_file_is_one_line(tmp_path, corrupt):
    ckpt = checkpoint.save_checkpoint(tmp_path, 1, torch.nn.Linear(2, 2), CheckpointMeta(kind="x"))
    f = ckpt / checkpoint.WEIGHTS
    good = f.read_bytes()
    f.write_bytes(
        {
            "huge header": struct.pack("<Q", 2**63) + good[8:],
            "offsets past the end": safetensors_header(
                {"weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 1 << 40]}}, b"\0" * 16
            ),
            "truncated": good[:-5],
            "empty": b"",
        }[corrupt]
    )
    with pytest.raises(ElmgenError, match="re-train or re-export") as e:
        checkpoint.load_weights(tmp_path, torch.nn.Linear(2, 2))
    assert str(f) in one_line_error(e)


@pytest.mark.parametrize(
    "text",
    [
        '{"kind": "x", ',
        "[1, 2]",
        '{"kind": 3}',
        '{"kind": "lm", "model": "tiny"}',
        '{"kind": "bae", "bits": true}',
        "\udcff",
    ],
)
def test_a_broken_config_json_is_one_line(tmp_path, text):
    ckpt = checkpoint.save_checkpoint(tmp_path, 1, torch.nn.Linear(2, 2), CheckpointMeta(kind="x"))
    (ckpt / checkpoint.CONFIG).write_bytes(text.encode(errors="surrogateescape"))
    with pytest.raises(ElmgenError, match="re-train or re-export") as e:
        checkpoint.load_config(tmp_path)
    assert str(ckpt / checkpoint.CONFIG) in one_line_error(e)


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    elmgen.io.atomic_write_text(tmp_path / "report.md", "x")
    (tmp_path / "plain.md").write_text("x")
    assert (tmp_path / "report.md").stat().st_mode == (tmp_path / "plain.md").stat().st_mode

"""--log tensorboard: the figures of metrics.jsonl and a reconstruction grid at each checkpoint, in TensorBoard
event files beside it, read back; drawing the grid leaves the run's trajectory alone."""

import sys

import pytest

from elmgen.cli import main
from elmgen.io import read_metrics

ARGS = [
    "tokenizer.base_width=16",
    "tokenizer.channel_mult=[1,2,2]",
    "tokenizer.latent_dim=16",
    "tokenizer.num_bits=8",
    "data.limit=32",
    "eval_images=8",
    "train.steps=4",
    "train.batch_size=4",
    "train.log_every=1",
    "train.save_every=2",
]


def test_tensorboard_event_files_hold_the_figures_and_a_grid_per_checkpoint(fake_fmnist, tmp_path, capsys):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="the tensorboard package is not installed: pip install 'elmgen[tensorboard]' to run this test",
    )
    assert main(["train-tokenizer", "--out", str(tmp_path / "plain"), *ARGS]) == 0
    assert main(["train-tokenizer", "--out", str(tmp_path / "board"), "--log", "tensorboard", *ARGS]) == 0
    capsys.readouterr()
    plain, rows = (read_metrics(tmp_path / run / "metrics.jsonl") for run in ("plain", "board"))
    assert [r["loss"] for r in rows] == [r["loss"] for r in plain]  # the grids drew nothing from the run's RNG
    assert not list((tmp_path / "plain").glob("events.out.tfevents.*"))
    events = event_accumulator.EventAccumulator(str(tmp_path / "board"), size_guidance={"images": 0})
    events.Reload()
    assert {"loss", "lr", "img_per_s", "l1", "l2"} <= set(events.Tags()["scalars"])
    losses = events.Scalars("loss")
    assert [e.step for e in losses] == [1, 2, 3, 4]
    assert [e.value for e in losses] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    grids = events.Images("preview")
    assert [g.step for g in grids] == [2, 4] and grids[0].width == 3 * (8 * 34 + 2)  # 8 images of 32 px, scaled 3x


def test_a_missing_log_kind_is_one_line(fake_fmnist, tmp_path, capsys):
    code = main(["train-tokenizer", "--out", str(tmp_path / "x"), *ARGS, "train.log=wandb"])
    err = capsys.readouterr().err
    assert code == 2 and "train.log must be one of jsonl, tensorboard" in err and not (tmp_path / "x").exists()


def test_tensorboard_without_its_package_is_one_line_before_any_work(fake_fmnist, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed: importing it fails
    code = main(["train-tokenizer", "--out", str(tmp_path / "x"), "--log", "tensorboard", *ARGS])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("elmgen: error:")]
    assert code == 2 and len(lines) == 1 and "pip install 'elmgen[tensorboard]'" in lines[0]
    assert not (tmp_path / "x").exists()

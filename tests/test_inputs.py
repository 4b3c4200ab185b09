"""The input pipeline: micro-batches made by DataLoader workers are the loop's, whatever the worker count, a
resumed run sees what an uninterrupted one did, augmentations are pure functions of their draws, and a
corrupt file found inside a worker is one line."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import elmgen.data.datasets
import elmgen.train.loop
from elmgen import checkpoint
from elmgen.cli import main
from elmgen.data import DataConfig
from elmgen.data.loader import default_workers, item_uniforms, micro_batches
from elmgen.data.transforms import random_blur, random_hflip, random_shift
from elmgen.evaluation.sources import DatasetImages
from elmgen.io import read_metrics
from elmgen.tokenizers import TokenizerConfig
from elmgen.train import TokenizerJob, TrainConfig, train_tokenizer

TINY = TokenizerConfig(base_width=16, channel_mult=[1, 2, 2], num_res_blocks=1, latent_dim=16, num_bits=8)


def test_shifts_and_flips_follow_their_draws_in_any_dtype():
    x = torch.arange(2 * 3 * 5 * 6).reshape(2, 3, 5, 6).to(torch.uint8)
    u_B2 = torch.tensor([[0.0, 0.99], [0.5, 0.3]])  # offsets (-2, +2) and (0, -1) for shift 2
    padded = F.pad(x.float(), (2, 2, 2, 2), mode="replicate")
    shifted = random_shift(x, 2, u_B2)
    assert shifted.dtype == torch.uint8
    assert torch.equal(shifted[0].float(), padded[0, :, 0:5, 4:10])
    assert torch.equal(shifted[1].float(), padded[1, :, 2:7, 1:7])
    flipped = random_hflip(x, torch.tensor([0.2, 0.7]))
    assert torch.equal(flipped[0], x[0].flip(-1)) and torch.equal(flipped[1], x[1])


def test_blur_follows_its_draw_along_both_axes():
    x = torch.zeros(3, 3, 9, 9, dtype=torch.uint8)
    x[..., 4:] = 200  # a vertical edge
    out = random_blur(x, 1.0, torch.tensor([0.0, 1.0, 0.5]))
    assert out.dtype == torch.uint8
    assert torch.equal(out[0], x[0])  # a draw of 0 leaves the image as it is
    gauss_K = torch.exp(-(torch.arange(-3.0, 4.0) ** 2) / 2)
    row_W = F.pad(x[1, :1, :1].float(), (3, 3), mode="replicate")[0, 0]  # the edge row, end pixels repeated
    expected_W = torch.stack([(row_W[i : i + 7] * gauss_K).sum() / gauss_K.sum() for i in range(9)]).round()
    assert torch.equal(out[1, 0, 0].float(), expected_W)  # sigma = 1 * max_sigma across the edge
    assert (out[1] == out[1, :, :1]).all()  # down the columns the image is flat, and stays so

    def soft_pixels(img):
        return ((img > 0) & (img < 200)).sum()

    assert soft_pixels(out[1]) > soft_pixels(out[2]) > 0  # half the draw: a narrower edge


def test_each_image_draws_its_own_augmentation():
    idx = np.array([5, 9, 5])
    u = item_uniforms(0, 3, idx, 2)
    assert torch.equal(u[0], u[2]) and not torch.equal(u[0], u[1])
    assert torch.equal(item_uniforms(0, 3, idx[1:2], 2)[0], u[1])  # the batch around an image changes nothing
    assert not torch.equal(item_uniforms(0, 4, idx, 2), u)  # a new draw every step
    assert torch.equal(item_uniforms(0, 3, idx, 3)[:, :2], u)  # a further draw leaves the earlier ones as they were


def load_pair(step, idx):
    return torch.as_tensor(idx) * 10 + step


def test_workers_deliver_the_loops_micro_batches_in_order_without_touching_the_global_rng():
    pairs = [(step, np.arange(3) + step) for step in range(5)]
    state = torch.get_rng_state()
    for workers in (0, 2):
        got = list(micro_batches(load_pair, workers, 0, iter(pairs), torch.device("cpu")))
        assert [g.tolist() for g in got] == [load_pair(s, i).tolist() for s, i in pairs], workers
    assert torch.equal(torch.get_rng_state(), state)
    assert default_workers(in_memory=True) == 0 and default_workers(in_memory=False) >= 0


def folder_job(image_folder, steps: int, save_every: int, workers: int) -> TokenizerJob:
    return TokenizerJob(
        data=DataConfig(source=str(image_folder), image_size=16, channels=3),
        tokenizer=TINY,
        hflip=True,
        eval_images=4,
        train=TrainConfig(
            steps=steps, batch_size=4, lr=1e-3, log_every=1, save_every=save_every, ema_decay=0.9, workers=workers
        ),
    )


@pytest.mark.slow
def test_a_run_killed_and_resumed_with_workers_equals_one_without(image_folder, tmp_path, monkeypatch, one_thread):
    train_tokenizer(folder_job(image_folder, 4, 100, workers=0), tmp_path / "straight")
    real = elmgen.train.loop._optimizer_step

    def killed_at_step_3(model, trained, cfg, step, *args):
        if step == 3:
            raise KeyboardInterrupt
        return real(model, trained, cfg, step, *args)

    monkeypatch.setattr(elmgen.train.loop, "_optimizer_step", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):  # the workers ran ahead of the step that died
        train_tokenizer(folder_job(image_folder, 4, 2, workers=2), tmp_path / "resumed")
    monkeypatch.setattr(elmgen.train.loop, "_optimizer_step", real)
    train_tokenizer(folder_job(image_folder, 4, 2, workers=1), tmp_path / "resumed", resume=True)
    rows = [read_metrics(tmp_path / run / "metrics.jsonl") for run in ("straight", "resumed")]
    assert [r["loss"] for r in rows[0]] == [r["loss"] for r in rows[1]] and len(rows[0]) == 4
    for name in (checkpoint.WEIGHTS, checkpoint.EMA):
        a, b = (checkpoint.resolve(tmp_path / run) / name for run in ("straight", "resumed"))
        assert a.read_bytes() == b.read_bytes(), name


def test_a_corrupt_file_found_in_a_worker_is_one_line(image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(elmgen.data.datasets, "CHECK_AT_LOAD_MAX_FILES", 0)  # as for a large folder: found late
    bad = image_folder / "class_1" / "broken.png"
    bad.write_bytes(b"not a png")
    argv = ["train-classifier", "--out", str(tmp_path / "c"), "--data", str(image_folder), "--workers", "1"]
    argv += ["data.image_size=16", "data.channels=3", "train.steps=8", "train.batch_size=8", "data.holdout=0"]
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("elmgen: error:")]
    assert code == 2 and len(lines) == 1 and str(bad) in lines[0], err
    assert "Traceback" not in err


def test_tokenize_with_workers_writes_the_files_it_writes_without(
    image_folder, tmp_path, monkeypatch, capsys, one_thread
):
    train_tokenizer(folder_job(image_folder, 1, 100, workers=0), tmp_path / "tok")
    argv = ["tokenize", "--tokenizer", str(tmp_path / "tok"), "--flip", "--batch-size", "3", "--shard-size", "5"]
    for workers in (0, 2):
        assert main([*argv, "--out", str(tmp_path / f"codes{workers}"), "--workers", str(workers)]) == 0
    names = sorted(p.name for p in (tmp_path / "codes0").iterdir())
    assert len([n for n in names if n.startswith("shard_")]) >= 3  # several shards, each of several batches
    assert names == sorted(p.name for p in (tmp_path / "codes2").iterdir())
    for name in names:
        assert (tmp_path / "codes0" / name).read_bytes() == (tmp_path / "codes2" / name).read_bytes(), name
    capsys.readouterr()

    monkeypatch.setattr(elmgen.data.datasets, "CHECK_AT_LOAD_MAX_FILES", 0)  # as for a large folder: found late
    bad = image_folder / "class_2" / "broken.png"
    bad.write_bytes(b"not a png")
    assert main([*argv, "--out", str(tmp_path / "codes_bad"), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("elmgen: error:")]
    assert len(lines) == 1 and str(bad) in lines[0] and "Traceback" not in err, err


def test_reference_images_decoded_by_workers_are_the_ones_read_without(image_folder):
    cfg = DataConfig(source=str(image_folder), image_size=16, channels=3)
    plain, fed = (list(DatasetImages(cfg, 16, 3, workers).batches(5, 16, 3)) for workers in (0, 2))
    n = len(DatasetImages(cfg, 16, 3, 0))
    assert [b.shape for b in plain] == [(min(5, n - s), 3, 16, 16) for s in range(0, n, 5)] and n > 5
    assert all(np.array_equal(a, b) for a, b in zip(plain, fed, strict=True))

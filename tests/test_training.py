import numpy as np
import pytest
import torch
from conftest import torchrun, write_fake_fmnist

import elmgen.train.budget
import elmgen.train.loop
from elmgen import checkpoint
from elmgen.checkpoint import CheckpointMeta
from elmgen.codes import CodeDataset, tokenize
from elmgen.data import DataConfig, load_dataset
from elmgen.errors import ElmgenError
from elmgen.io import read_metrics
from elmgen.models import ModelConfig, load_model, preset
from elmgen.schedules import lr_at
from elmgen.tokenizers import TokenizerConfig, load_tokenizer
from elmgen.train import (
    LMJob,
    TokenizerJob,
    TrainConfig,
    batch_indices,
    fit,
    make_optimizer,
    prepare,
    train_lm,
    train_tokenizer,
)
from elmgen.train.budget import steps_within
from elmgen.vocab import Vocab

TOKENIZER = dict(base_width=16, channel_mult=[1, 2, 2], num_res_blocks=1, latent_dim=16, num_bits=8)


def test_lr_schedule():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, lr_decay="cosine", min_lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(50, TrainConfig(lr=0.3)) == 0.3


def test_batches_cover_each_epoch_once():
    seen = np.concatenate([batch_indices(s, 8, 20, seed=3) for s in range(5)])  # 40 = two epochs
    assert sorted(seen[:20]) == list(range(20)) and sorted(seen[20:]) == list(range(20))
    assert not np.array_equal(seen[:20], seen[20:])


def test_weight_decay_only_on_matrices():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = make_optimizer(model, TrainConfig(weight_decay=0.05)).param_groups
    assert [p.shape for p in decay["params"]] == [(4, 4)] and decay["weight_decay"] == 0.05
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tokenizer and its code folder, built once for the module; the tests only read them."""
    tmp = tmp_path_factory.mktemp("training")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ELMGEN_FASHION_MNIST", str(write_fake_fmnist(tmp / "fmnist")))
        job = TokenizerJob(
            data=DataConfig(limit=64),
            eval_images=20,
            tokenizer=TokenizerConfig(**TOKENIZER),
            train=TrainConfig(steps=4, batch_size=8, lr=1e-3, log_every=2, save_every=4),
        )
        train_tokenizer(job, tmp / "tok")
        tok, meta = load_tokenizer(tmp / "tok")
        ds = load_dataset(DataConfig(limit=40))
        tokenize(tok, meta, ds, tmp / "codes", Vocab.split(8, 2), flip=True)
    return tmp / "tok", tmp / "codes"


@pytest.fixture
def trained_tokenizer(tiny_run):
    return tiny_run[0]


@pytest.fixture
def codes(tiny_run):
    return tiny_run[1]


def test_tokenize_writes_codes_with_flipped_copies(codes, trained_tokenizer):
    data = CodeDataset(codes)
    assert len(data) == 80 and data.codes.shape == (80, 64) and data.codes.dtype == np.uint16
    assert data.meta["bits"] == 8 and data.meta["grid"] == 8 and data.meta["flip"]
    assert data.meta["tokenizer_fingerprint"] == checkpoint.fingerprint(trained_tokenizer)
    assert np.array_equal(data.labels[:40], data.labels[40:])
    sub, labels = data.batch(np.array([3, 0]), Vocab.parse("4-2"))
    assert sub.shape == (2, 64, 4) and sub.max() < 4 and labels.tolist() == [3, 0]


def lm_job(steps: int, save_every: int) -> LMJob:
    return LMJob(
        model=ModelConfig(**{**preset("micro"), "dropout": 0.1}, vocab="2-4", grid_size=8, num_classes=10),
        train=TrainConfig(
            steps=steps,
            batch_size=4,
            lr=3e-3,
            warmup_steps=2,
            lr_decay="cosine",
            log_every=1,
            save_every=save_every,
            ema_decay=0.9,
        ),
    )


def test_resume_reproduces_an_uninterrupted_run(codes, tmp_path, monkeypatch):
    straight = train_lm(lm_job(8, 100), codes, tmp_path / "a")

    real_batch_indices = elmgen.train.loop.batch_indices

    def crash_at_step_6(step, *args):
        if step == 6:
            raise KeyboardInterrupt  # killed after the step-4 checkpoint and two more logged steps
        return real_batch_indices(step, *args)

    monkeypatch.setattr(elmgen.train.loop, "batch_indices", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train_lm(lm_job(8, 4), codes, tmp_path / "b")
    monkeypatch.setattr(elmgen.train.loop, "batch_indices", real_batch_indices)
    assert len(read_metrics(tmp_path / "b" / "metrics.jsonl")) == 6
    resumed = train_lm(lm_job(8, 4), codes, tmp_path / "b", resume=True)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    for name in (checkpoint.WEIGHTS, checkpoint.EMA):
        a, b = (checkpoint.resolve(p) / name for p in (tmp_path / "a", tmp_path / "b"))
        assert a.read_bytes() == b.read_bytes(), name
    assert (tmp_path / "b" / "loss.png").is_file()


def test_sampling_loads_the_ema_weights_unless_told_otherwise(codes, tmp_path):
    from safetensors.torch import load_file

    train_lm(lm_job(4, 4), codes, tmp_path / "run")
    ckpt = checkpoint.resolve(tmp_path / "run")
    raw, ema = load_file(ckpt / checkpoint.WEIGHTS), load_file(ckpt / checkpoint.EMA)
    assert set(ema) == {name for name, _ in load_model(tmp_path / "run")[0].named_parameters()}
    assert torch.equal(load_model(tmp_path / "run")[0].head.weight, ema["head.weight"])
    assert torch.equal(load_model(tmp_path / "run", ema=False)[0].head.weight, raw["head.weight"])
    assert not torch.equal(raw["head.weight"], ema["head.weight"])


def test_existing_run_needs_resume_and_resume_needs_a_run(codes, tmp_path):
    train_lm(lm_job(2, 2), codes, tmp_path / "run")
    with pytest.raises(ElmgenError, match="--resume"):
        train_lm(lm_job(2, 2), codes, tmp_path / "run")
    with pytest.raises(ElmgenError, match="nothing to resume"):
        train_lm(lm_job(2, 2), codes, tmp_path / "other", resume=True)


def test_vocab_must_match_code_bits(codes, tmp_path):
    job = lm_job(2, 2)
    job.model.vocab = "2-8"
    with pytest.raises(ElmgenError, match="K=8"):
        train_lm(job, codes, tmp_path / "run")


def test_checkpoint_writes_are_atomic_and_pruned(tmp_path):
    model = torch.nn.Linear(2, 2)
    for step in (1, 2, 3):
        checkpoint.save_checkpoint(tmp_path, step, model, CheckpointMeta(kind="x"), keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_00000002", "step_00000003"]
    assert checkpoint.resolve(tmp_path).name == "step_00000003"
    assert checkpoint.load_config(tmp_path) == {"kind": "x", "step": 3}


def deterministic_job(steps: int, **train) -> LMJob:
    job = lm_job(steps, steps)
    job.model.dropout = job.model.class_dropout = 0.0  # random draws differ between batch layouts
    job.train.batch_size = 8
    for k, v in train.items():
        setattr(job.train, k, v)
    return job


def test_grad_accumulation_matches_one_big_batch(codes, tmp_path):
    one = train_lm(deterministic_job(4), codes, tmp_path / "one")
    accum = train_lm(deterministic_job(4, grad_accum=4), codes, tmp_path / "accum")
    assert [r["loss"] for r in accum] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    with pytest.raises(ElmgenError, match="divisible"):
        train_lm(deterministic_job(1, grad_accum=3), codes, tmp_path / "bad")


@pytest.mark.slow
def test_activation_checkpointing_and_compile_keep_the_losses(codes, tmp_path):
    plain = [r["loss"] for r in train_lm(deterministic_job(3), codes, tmp_path / "plain")]
    recomputed = train_lm(deterministic_job(3, activation_checkpointing=True), codes, tmp_path / "ac")
    assert [r["loss"] for r in recomputed] == pytest.approx(plain, rel=1e-6)
    compiled = train_lm(deterministic_job(3, compile=True), codes, tmp_path / "compiled")
    assert [r["loss"] for r in compiled] == pytest.approx(plain, rel=1e-4)
    # the compiled run's checkpoint has the plain parameter names: it loads into an uncompiled model
    assert load_model(tmp_path / "compiled")[0].cfg.n_layer == 2


def test_a_non_finite_loss_stops_the_run_before_the_next_checkpoint(tmp_path):
    def step_fn(model, step, idx):
        loss = model(torch.ones(len(idx), 2)).pow(2).mean()
        return (loss * float("nan") if step == 2 else loss), {}

    cfg = TrainConfig(steps=10, batch_size=2, log_every=5, save_every=2)
    with pytest.raises(ElmgenError, match="non-finite before step 4"):
        fit(torch.nn.Linear(2, 1), cfg, tmp_path, step_fn, num_items=8, meta=CheckpointMeta(kind="x"))
    assert checkpoint.resolve(tmp_path).name == "step_00000002"


def test_steps_within_a_budget():
    assert steps_within(300, elapsed_s=90, steps_done=6, s_per_step=10) == 27
    assert steps_within(60, elapsed_s=90, steps_done=6, s_per_step=10) == 7  # over budget: one more step


def test_a_time_budget_decides_the_step_count_once_and_a_resumed_run_keeps_it(tmp_path, monkeypatch):
    """A fake clock advanced by the steps: the first takes 40 s, the next 10 s each (then, after the crash, 30 s)."""
    now = {"t": 0.0, "step_s": 10.0}
    monkeypatch.setattr(elmgen.train.budget, "clock", lambda device: now["t"])

    def step_fn(model, step, idx):
        if step == 15 and now["step_s"] == 10:
            raise KeyboardInterrupt  # killed after the step-10 checkpoint
        now["t"] += now["step_s"] + (30 if step == 0 else 0)
        return model(torch.ones(len(idx), 2)).pow(2).mean(), {}

    cfg = TrainConfig(steps=1000, batch_size=2, log_every=1, save_every=10, time_budget_s=300, lr_decay="cosine")
    with pytest.raises(KeyboardInterrupt):
        fit(torch.nn.Linear(2, 1), cfg, tmp_path, step_fn, num_items=8, meta=CheckpointMeta(kind="x"))
    # steps 2-6 took 50 s: 6 steps in 90 s, then 21 more of 10 s fit the remaining 210 s
    assert checkpoint.load_config(tmp_path)["total_steps"] == 27
    now["step_s"] = 30.0  # a slower machine on resume: the decided count stands
    rows = fit(torch.nn.Linear(2, 1), cfg, tmp_path, step_fn, num_items=8, meta=CheckpointMeta(kind="x"), resume=True)
    assert rows[-1]["step"] == 27 and checkpoint.load_config(tmp_path)["step"] == 27
    assert rows[-1]["lr"] == pytest.approx(lr_at(26, cfg, 27)) and lr_at(26, cfg, 27) < lr_at(26, cfg)


def test_a_few_slow_steps_at_the_start_do_not_shorten_a_budgeted_run(tmp_path, monkeypatch, capsys):
    """Steps 2-5 take 40 s (another program starting beside the run), the others 10 s."""
    now = {"t": 0.0}
    monkeypatch.setattr(elmgen.train.budget, "clock", lambda device: now["t"])

    def step_fn(model, step, idx):
        now["t"] += 40 if 1 <= step <= 4 else 10
        return model(torch.ones(len(idx), 2)).pow(2).mean(), {}

    cfg = TrainConfig(steps=5, batch_size=2, log_every=50, save_every=100, time_budget_s=3000)
    rows = fit(torch.nn.Linear(2, 1), cfg, tmp_path, step_fn, num_items=8, meta=CheckpointMeta(kind="x"))
    # the first count (step 6: median 40 s, 76 steps) is replaced at step 13 (median 10 s): 250 s spent, 275 more
    assert rows[-1]["step"] == 288 and checkpoint.load_config(tmp_path)["total_steps"] == 288
    assert capsys.readouterr().err.count("steps fit the") == 1


def test_models_opt_in_to_recomputation_and_sharding():
    with pytest.raises(ElmgenError, match="activation_checkpointing is not supported"):
        prepare(torch.nn.Linear(2, 2), TrainConfig(activation_checkpointing=True), world=1)
    with pytest.raises(ElmgenError, match="fsdp is not supported"):
        prepare(torch.nn.Linear(2, 2), TrainConfig(fsdp=True), world=2)


@pytest.mark.slow
@pytest.mark.parametrize("parallel,grad_accum", [("ddp", 1), ("ddp", 2), ("fsdp", 1), ("fsdp", 2), ("fsdp-compile", 1)])
def test_two_processes_train_like_one(codes, tmp_path, parallel, grad_accum):
    """torchrun with 2 CPU processes (gloo): each takes half of every global batch; gradients are averaged
    (DDP) or reduce-scattered onto parameter shards (FSDP, also with each block compiled on its own), with
    grad_accum only after the last micro-batch."""

    single = train_lm(deterministic_job(4), codes, tmp_path / "single")
    args = [
        "train",
        "--codes",
        str(codes),
        "--out",
        str(tmp_path / "ddp"),
        "--preset",
        "micro",
        "--vocab",
        "2-4",
        "model.dropout=0",
        "model.class_dropout=0",
        "train.steps=4",
        "train.batch_size=8",
        "train.lr=3e-3",
        "train.warmup_steps=2",
        "train.lr_decay=cosine",
        "train.log_every=1",
        "train.save_every=4",
        "train.ema_decay=0.9",
        f"train.grad_accum={grad_accum}",
    ] + {"ddp": [], "fsdp": ["--fsdp"], "fsdp-compile": ["--fsdp", "--compile"]}[parallel]
    done = torchrun("-m", "elmgen.cli", *args)
    assert done.returncode == 0, done.stderr[-2000:]
    ddp = read_metrics(tmp_path / "ddp" / "metrics.jsonl")
    assert [r["step"] for r in ddp] == [1, 2, 3, 4]
    rel = 1e-4 if parallel == "fsdp-compile" else 1e-5  # compiled kernels fuse (reorder) float arithmetic
    assert [r["loss"] for r in ddp] == pytest.approx([r["loss"] for r in single], rel=rel)
    # the same weights and EMA, whole tensors in the checkpoint
    for name in (checkpoint.WEIGHTS, checkpoint.EMA):
        one, two = (checkpoint.load_tensors(checkpoint.resolve(tmp_path / run) / name) for run in ("single", "ddp"))
        assert one.keys() == two.keys()
        for key in one:
            where = f"{name} {key}"
            torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=lambda m, w=where: f"{w}: {m}")
    # ... and the 2-process checkpoint resumes in one process
    more = train_lm(deterministic_job(6), codes, tmp_path / "ddp", resume=True)
    assert [r["step"] for r in more] == list(range(1, 7))


def test_auto_precision_follows_native_bf16(monkeypatch):
    from elmgen import device

    cpu = torch.device("cpu")
    assert device.resolve_precision("auto", cpu) == ("bf16" if device.native_bf16(cpu) else "fp32")
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(device, "native_bf16", lambda device, n=native: n)
        assert device.resolve_precision("auto", cpu) == expected
        assert device.resolve_precision("fp32", cpu) == "fp32" and device.resolve_precision("bf16", cpu) == "bf16"
        with device.autocast(cpu, "auto"):
            assert torch.is_autocast_enabled("cpu") == native


def test_tensorboard_shows_the_lm_samples_at_each_checkpoint_without_changing_the_run(codes, tmp_path):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="the tensorboard package is not installed: pip install 'elmgen[tensorboard]' to run this test",
    )
    plain = train_lm(lm_job(2, 1), codes, tmp_path / "plain")
    job = lm_job(2, 1)
    job.train.log = "tensorboard"
    rows = train_lm(job, codes, tmp_path / "board")
    assert [r["loss"] for r in rows] == [r["loss"] for r in plain]  # sampling drew nothing from the run's RNG
    events = event_accumulator.EventAccumulator(str(tmp_path / "board"), size_guidance={"images": 0})
    events.Reload()
    assert {"loss", "lr", "tok_per_s"} <= set(events.Tags()["scalars"])
    assert [g.step for g in events.Images("preview")] == [1, 2]  # 10 classes x 2 samples of 32 px, scaled 2x
    assert (events.Images("preview")[0].width, events.Images("preview")[0].height) == (2 * 70, 2 * 342)


class TwoNets(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net, self.critic = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)


def test_a_part_trains_on_its_own_optimizer_schedule_and_clip_outside_the_ema(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from elmgen.train.config import OptimizerConfig
    from elmgen.train.loop import Part

    def net_step(model, step, idx):
        return model.net(torch.ones(len(idx), 3) * (step + 1)).pow(2).mean(), {}

    def critic_step(model, step, idx):
        return 100 * model.critic(torch.ones(len(idx), 3)).pow(2).mean(), {"critic": 1.0}

    clips, real_clip = [], torch.nn.utils.clip_grad_norm_

    def recorded_clip(params, max_norm):
        clips.append((len(params), max_norm))
        return real_clip(params, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recorded_clip)
    cfg = TrainConfig(steps=4, batch_size=2, lr=1e-2, log_every=1, save_every=4, ema_decay=0.5)
    critic = Part("critic", OptimizerConfig(lr=0.2, warmup_steps=2, grad_clip=0.25), critic_step, start=2)
    meta = CheckpointMeta(kind="x")
    torch.manual_seed(0)
    alone = TwoNets()
    fit(alone, cfg, tmp_path / "alone", net_step, num_items=8, meta=meta)
    torch.manual_seed(0)
    both = TwoNets()
    rows = fit(both, cfg, tmp_path / "both", net_step, num_items=8, meta=meta, parts=(critic,))
    assert clips[4:] == [(2, 1.0), (2, 1.0), (2, 1.0), (2, 0.25), (2, 1.0), (2, 0.25)]  # (weight and bias, clip)
    assert [r.get("lr_critic") for r in rows] == [None, None, 0.1, 0.2]  # warm-up from the part's start
    for a, b in zip(alone.net.parameters(), both.net.parameters(), strict=True):
        assert torch.equal(a, b)  # the critic's gradients neither clip nor move the model's weights
    assert not torch.equal(alone.critic.weight, both.critic.weight)
    ckpt = checkpoint.resolve(tmp_path / "both")
    assert set(load_file(ckpt / checkpoint.EMA)) == {"net.weight", "net.bias"}
    saved = checkpoint.load_trainer_state(ckpt)["optimizer"]["state"]
    assert set(saved) == {"net.weight", "net.bias", "critic.weight", "critic.bias"}
    assert [float(saved[k]["step"]) for k in ("net.weight", "critic.weight")] == [4, 2]

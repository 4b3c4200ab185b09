"""Perceptual loss from a user's weights file, the PatchGAN and its adaptive weight, EMA, exact resume."""

import json

import numpy as np
import pytest
import torch
from conftest import torchrun
from safetensors.torch import save_file

import elmgen.train.loop
from elmgen import checkpoint
from elmgen.cli import main
from elmgen.data import DataConfig
from elmgen.errors import ElmgenError
from elmgen.io import read_metrics
from elmgen.tokenizers import TokenizerConfig, load_tokenizer
from elmgen.tokenizers.losses import (
    LossConfig,
    PatchDiscriminator,
    PerceptualLoss,
    adaptive_weight,
    edge_weights,
    hinge_d_loss,
    load_perceptual,
    lpips_state_dict,
)
from elmgen.train import TokenizerJob, TokenizerTraining, TrainConfig, tokenizer_step, train_tokenizer
from elmgen.train.config import OptimizerConfig
from elmgen.train.tokenizer import checkpoint_meta, discriminator_step

TINY = TokenizerConfig(base_width=16, channel_mult=[1, 2, 2], num_res_blocks=1, latent_dim=16, num_bits=8)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A perceptual weights file in the documented layout (random VGG16, non-negative heads), as .pth."""
    torch.manual_seed(1)
    model = PerceptualLoss()
    for lin in model.lins:
        lin.weight.data.uniform_(0, 1)
    path = tmp_path_factory.mktemp("lpips") / "lpips_vgg16.pth"
    torch.save({**lpips_state_dict(model), "classifier.0.weight": torch.zeros(2, 2)}, path)  # extras are ignored
    return path


def test_weights_file_layout_is_torchvision_vgg16_plus_lpips_heads():
    keys = set(lpips_state_dict(PerceptualLoss()))
    convs = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]  # torchvision's vgg16.features conv indices
    assert keys == {f"features.{i}.{p}" for i in convs for p in ("weight", "bias")} | {
        f"lin{i}.model.1.weight" for i in range(5)
    }


def test_perceptual_distance_properties(weights_file, tmp_path):
    loss = load_perceptual(weights_file)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    d = loss(x, y)
    assert d.shape == (3,) and (d > 0).all()
    assert torch.allclose(loss(x, x), torch.zeros(3), atol=1e-6)
    assert torch.allclose(loss(y, x), d, atol=1e-6)
    grey, rgb = x[:, :1], x[:, :1].expand(-1, 3, -1, -1)
    assert torch.allclose(loss(grey, grey.flip(-1)), loss(rgb, rgb.flip(-1)))  # grey is read as RGB
    y.requires_grad_()
    loss(x, y).sum().backward()
    assert y.grad.abs().sum() > 0 and all(p.grad is None for p in loss.parameters())  # frozen
    state = lpips_state_dict(loss)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    assert torch.allclose(load_perceptual(tmp_path / "w.safetensors")(x, y), d)


def test_perceptual_first_tap_by_hand(weights_file):
    """With only the first head (all ones), the distance is the spatial mean of the summed squared differences
    of unit-normalised relu1_2 features."""
    loss = load_perceptual(weights_file)
    for i, lin in enumerate(loss.lins):
        lin.weight.data.fill_(1.0 if i == 0 else 0.0)
    x, y = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1

    def relu1_2(t):
        f = loss.features[:4]((t - loss.shift) / loss.scale)
        return f / f.norm(dim=1, keepdim=True)

    expected = (relu1_2(x) - relu1_2(y)).pow(2).sum(1).mean((1, 2))
    assert torch.allclose(loss(x, y), expected, atol=1e-5)


def test_bad_weights_files_are_one_clear_error(weights_file, tmp_path):
    with pytest.raises(ElmgenError, match="not found"):
        load_perceptual(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ElmgenError, match="cannot read"):
        load_perceptual(tmp_path / "junk.pth")
    state = torch.load(weights_file)
    del state["lin3.model.1.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ElmgenError, match="missing.*lin3"):
        load_perceptual(tmp_path / "partial.pth")
    state["lin3.model.1.weight"] = torch.zeros(1, 7, 1, 1)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(ElmgenError, match="wrong shape.*lin3"):
        load_perceptual(tmp_path / "shape.pth")


def test_patch_discriminator_and_hinge_loss():
    disc = PatchDiscriminator(3)
    assert disc(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 2, 2)
    assert disc.min_image_size() == 24 and disc(torch.zeros(2, 3, 24, 24)).shape == (2, 1, 1, 1)
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * ((0 + 0.5) / 2 + (0 + 1) / 2))


def test_adaptive_weight_is_the_gradient_ratio_clamped_to_one():
    w = torch.ones(4, requires_grad=True)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    rec, gen = (w * x).sum(), 10 * (w * x).sum()
    assert adaptive_weight(rec, gen, w).item() == pytest.approx(0.1, rel=1e-4)
    assert adaptive_weight(gen, rec, w).item() == 1.0  # ratio 10, clamped


def job(steps: int, save_every: int, **loss) -> TokenizerJob:
    return TokenizerJob(
        data=DataConfig(limit=64),
        tokenizer=TINY,
        eval_images=16,
        loss=LossConfig(gan=True, gan_start=2, **loss),
        discriminator=OptimizerConfig(lr=2e-3, warmup_steps=2, weight_decay=0.0, grad_clip=0.5),
        train=TrainConfig(
            steps=steps,
            batch_size=8,
            lr=1e-3,
            weight_decay=0.0,
            log_every=1,
            save_every=save_every,
            precision="bf16",
            ema_decay=0.9,
        ),
    )


def test_generator_and_discriminator_losses_reach_only_their_own_network():
    trainer = TokenizerTraining(job(1, 1))
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    torch.manual_seed(0)
    loss, logs, recon = tokenizer_step(trainer, x, 5, job(1, 1).loss, None)
    loss.backward()
    assert {"gen", "gan_weight"} <= set(logs) and 0 <= logs["gan_weight"] <= 0.5
    assert all(p.grad is None for p in trainer.discriminator.parameters())
    assert all(p.grad is not None for p in trainer.tokenizer.parameters())
    trainer.zero_grad(set_to_none=True)
    d_loss, logs = discriminator_step(trainer.discriminator, x, recon)
    d_loss.backward()
    assert logs["disc"] == d_loss.item() and all(p.grad is None for p in trainer.tokenizer.parameters())
    grads = [p.grad.clone() for p in trainer.discriminator.parameters()]
    trainer.zero_grad()
    hinge_d_loss(trainer.discriminator(x), trainer.discriminator(recon.detach())).backward()
    for g, p in zip(grads, trainer.discriminator.parameters(), strict=True):
        assert torch.allclose(g, p.grad, atol=1e-6)


def test_edge_weights_single_out_the_pixels_beside_an_edge():
    x = -torch.ones(2, 3, 8, 8)
    x[0, 1, :, 5:] = 1.0  # image 0: a vertical edge between columns 4 and 5, in one channel
    w = edge_weights(x, 4.0)
    assert w.shape == (2, 1, 8, 8) and torch.allclose(w.mean(), torch.tensor(1.0))
    beside = torch.zeros(8, 8, dtype=torch.bool)
    beside[:, 4:6] = True
    assert torch.allclose(w[0, 0][beside], 5 * w[1, 0, 0, 0])  # 1 + 4 against 1
    assert (w[0, 0][~beside] == w[1, 0, 0, 0]).all() and (w[1] == w[1, 0, 0, 0]).all()  # flat image: all equal
    x[1] += 6 / 127.5  # a step under 8 grey levels is no edge
    x[1, :, :, :4] -= 6 / 127.5
    assert (edge_weights(x, 4.0)[1] == w[1, 0, 0, 0]).all()


def test_the_edge_weight_moves_the_loss_only_where_edges_are():
    trainer = TokenizerTraining(job(1, 1))
    x = -torch.ones(2, 1, 32, 32)
    x[:, :, 8:24, 8:24] = 1.0  # a square
    plain, weighted = LossConfig(), LossConfig(edge_weight=4.0)
    torch.manual_seed(0)
    loss_plain, logs_plain, recon = tokenizer_step(trainer.eval(), x, 0, plain, None)
    torch.manual_seed(0)
    loss_edge, logs_edge, _ = tokenizer_step(trainer, x, 0, weighted, None)
    assert logs_edge["l1"] == logs_plain["l1"]  # the logs keep the plain errors
    err = (recon.float() - x).abs()
    w = edge_weights(x, 4.0)
    expected = loss_plain + (w * err).mean() - err.mean() + (w * err.pow(2)).mean() - err.pow(2).mean()
    assert torch.allclose(loss_edge, expected, atol=1e-5)
    assert not torch.allclose(loss_edge, loss_plain)


@pytest.mark.slow
def test_gan_starts_late_and_resume_is_exact(fake_fmnist, tmp_path, monkeypatch):
    straight = tmp_path / "a"
    train_tokenizer(job(5, 100), straight)
    rows = read_metrics(straight / "metrics.jsonl")
    assert ["disc" in r for r in rows] == [False, False, True, True, True]  # gan_start=2
    # the discriminator's own schedule, its warm-up counted from gan_start
    assert [r.get("lr_discriminator") for r in rows] == [None, None, 1e-3, 2e-3, 2e-3]

    real = elmgen.train.loop.batch_indices

    def crash_at_step_4(step, *args):
        if step == 4:
            raise KeyboardInterrupt
        return real(step, *args)

    monkeypatch.setattr(elmgen.train.loop, "batch_indices", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train_tokenizer(job(5, 3), tmp_path / "b")  # checkpoint at step 3: discriminator and its Adam state in use
    monkeypatch.setattr(elmgen.train.loop, "batch_indices", real)
    train_tokenizer(job(5, 3), tmp_path / "b", resume=True)
    assert [r["loss"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")] == [r["loss"] for r in rows]
    for name in (checkpoint.WEIGHTS, checkpoint.EMA):
        a, b = (checkpoint.resolve(p) / name for p in (straight, tmp_path / "b"))
        assert a.read_bytes() == b.read_bytes(), name


@pytest.mark.slow
def test_ema_weights_are_the_ones_saved_for_use(fake_fmnist, tmp_path):
    from safetensors.torch import load_file

    train_tokenizer(job(3, 3), tmp_path / "run")
    ckpt = checkpoint.resolve(tmp_path / "run")
    state, ema = load_file(ckpt / checkpoint.WEIGHTS), load_file(ckpt / checkpoint.EMA)
    assert any(k.startswith("discriminator.") for k in state) and set(ema) <= set(state)
    model, _ = load_tokenizer(tmp_path / "run")
    last = f"tokenizer.decoder.net.{len(model.decoder.net) - 1}.weight"
    assert torch.equal(model.last_layer, ema[last])
    assert not torch.equal(model.last_layer, state[last])
    no_ema = job(3, 3)
    no_ema.train.ema_decay = 0.0
    train_tokenizer(no_ema, tmp_path / "plain")
    ckpt = checkpoint.resolve(tmp_path / "plain")
    assert not (ckpt / checkpoint.EMA).exists()
    assert torch.equal(load_tokenizer(tmp_path / "plain")[0].last_layer, load_file(ckpt / checkpoint.WEIGHTS)[last])


@pytest.mark.slow
def test_checkpoints_of_one_optimizer_over_both_networks_still_load_and_resume(fake_fmnist, tmp_path):
    """Before the discriminator had an optimizer of its own, the loop trained TokenizerTraining with one AdamW
    (matrices in one group, the rest in another) and kept an EMA of every parameter, the discriminator's too."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    old = job(4, 4)
    torch.manual_seed(0)
    trainer = TokenizerTraining(old)
    params = list(trainer.parameters())
    groups = [[p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]]
    opt = torch.optim.AdamW([{"params": g, "weight_decay": 0.0} for g in groups], lr=1e-3, betas=(0.9, 0.95))
    x = torch.rand(8, 1, 32, 32) * 2 - 1
    loss, _, recon = tokenizer_step(trainer, x, 3, old.loss, None)
    (loss + discriminator_step(trainer.discriminator, x, recon)[0]).backward()  # the old step's one objective
    opt.step()
    ema = {name: p.detach() + 0.01 for name, p in trainer.named_parameters()}
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = {"optimizer": get_optimizer_state_dict(trainer, opt, options=full), "step": 3, "total_steps": 4}
    state.update(rng=torch.get_rng_state(), cuda_rng=None)
    meta = checkpoint_meta(old, trainer.tokenizer, ["a"] * 10)
    checkpoint.save_checkpoint(tmp_path / "old", 3, trainer, meta, state, ema=ema)

    model, _ = load_tokenizer(tmp_path / "old")  # for use: the tokenizer's EMA weights
    assert torch.equal(model.last_layer, ema[f"tokenizer.decoder.net.{len(model.decoder.net) - 1}.weight"])
    train_tokenizer(old, tmp_path / "old", resume=True)  # one more step, each network with its own optimizer
    ckpt = checkpoint.resolve(tmp_path / "old")
    assert ckpt.name == "step_00000004"
    assert not any(k.startswith("discriminator.") for k in checkpoint.load_ema(ckpt))  # the EMA: the generator's
    adam = checkpoint.load_trainer_state(ckpt)["optimizer"]["state"]
    for name in ("tokenizer.decoder.net.0.weight", "discriminator.net.0.weight"):
        assert float(adam[name]["step"]) == 2, name  # the old optimizer's moments, split by network, continued


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_gan_and_perceptual_options(fake_fmnist, weights_file, tmp_path, capsys):
    args = [
        "tokenizer.base_width=16",
        "tokenizer.channel_mult=[1,2,2]",
        "tokenizer.latent_dim=16",
        "tokenizer.num_bits=8",
        "train.batch_size=4",
        "train.log_every=1",
        "eval_images=8",
        "data.limit=16",
        "train.steps=2",
        "loss.gan_start=1",
    ]
    code, out, err = run(
        capsys, "train-tokenizer", "--out", tmp_path / "t", "--gan", "--perceptual-weights", weights_file, *args
    )
    assert code == 0, err
    rows = read_metrics(tmp_path / "t" / "metrics.jsonl")
    assert "perceptual" in rows[0] and "disc" not in rows[0] and "disc" in rows[1]
    assert json.loads(out)["bits"] == 8
    code, _, err = run(
        capsys, "train-tokenizer", "--out", tmp_path / "u", "--perceptual-weights", tmp_path / "none.pth", *args
    )
    lines = [line for line in err.splitlines() if line.startswith("elmgen: error:")]
    assert code == 2 and len(lines) == 1 and "perceptual weights file not found" in lines[0]
    code, _, err = run(
        capsys,
        "train-tokenizer",
        "--out",
        tmp_path / "v",
        "--gan",
        *args,
        "data.image_size=16",
        "tokenizer.channel_mult=[1,2]",
    )
    assert code == 2 and "at least 24 px" in err
    assert not np.isnan(rows[-1]["loss"])


@pytest.mark.slow
def test_two_processes_train_the_gan_tokenizer(fake_fmnist, tmp_path):
    """torchrun with 2 CPU processes: DDP runs the tokenizer's step (a method, not a forward) and finds the
    discriminator unused before gan_start. Until then (deterministic codes) the losses are one process's; after it
    the discriminator's BatchNorm sees half batches, so only finiteness and a one-process resume are checked."""

    single = job(4, 4)
    single.tokenizer = TokenizerConfig(**{**vars(TINY), "binarization": "deterministic"})
    single.train.precision = "fp32"
    train_tokenizer(single, tmp_path / "one")
    args = ["train-tokenizer", "--out", str(tmp_path / "two"), "--gan", "tokenizer.binarization=deterministic"]
    args += [
        "tokenizer.base_width=16",
        "tokenizer.channel_mult=[1,2,2]",
        "tokenizer.latent_dim=16",
        "tokenizer.num_bits=8",
        "data.limit=64",
        "eval_images=16",
        "loss.gan_start=2",
        "train.steps=4",
        "train.batch_size=8",
        "train.lr=1e-3",
        "train.weight_decay=0",
        "train.warmup_steps=0",
        "train.log_every=1",
        "train.save_every=4",
        "train.ema_decay=0.9",
        "train.workers=1",  # the input pipeline under torchrun too: each process its own worker
    ]
    done = torchrun("-m", "elmgen.cli", *args)
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = (read_metrics(tmp_path / run / "metrics.jsonl") for run in ("one", "two"))
    assert [r["loss"] for r in two[:2]] == pytest.approx([r["loss"] for r in one[:2]], rel=1e-5)
    assert ["disc" in r for r in two] == [False, False, True, True] and all(np.isfinite(r["loss"]) for r in two)
    resumed = job(5, 4)
    resumed.tokenizer, resumed.train.precision = single.tokenizer, "fp32"
    assert read_metrics(tmp_path / "two" / "metrics.jsonl")[-1]["step"] == 4
    train_tokenizer(resumed, tmp_path / "two", resume=True)
    assert read_metrics(tmp_path / "two" / "metrics.jsonl")[-1]["step"] == 5

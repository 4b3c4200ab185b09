"""The masked model (MLM) and MaskGIT decoding."""

import math

import pytest
import torch

from elmgen.models import ModelConfig, Transformer, preset
from elmgen.sampling import SampleConfig, generate, generate_mlm
from elmgen.schedules import cells_left_masked, masked_fraction
from elmgen.train import mlm_loss


@pytest.fixture
def mlm():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**preset("micro"), vocab="2-4", grid_size=4, num_classes=3, kind="mlm"))
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return model.eval()


def record_inputs(model, monkeypatch):
    """Capture the cell codes the model is fed at every decoding step."""
    seen = []
    forward = model.forward

    def spy(labels, sub, caches=None, **loss):
        seen.append((labels.clone(), sub.clone()))
        return forward(labels, sub, caches, **loss)

    monkeypatch.setattr(model, "forward", spy)
    return seen


def test_cosine_schedule():
    assert float(masked_fraction(0.0)) == 1.0 and abs(float(masked_fraction(1.0))) < 1e-12
    left = [cells_left_masked(t, 10, 64) for t in range(10)]
    assert left == [math.floor(64 * math.cos(math.pi / 2 * (t + 1) / 10) + 1e-9) for t in range(9)] + [0]
    assert all(a > b for a, b in zip([64] + left, left, strict=False))  # strictly fewer masked each step
    per_image = cells_left_masked(3, 10, torch.tensor([64, 10, 0]))
    assert per_image.tolist() == [cells_left_masked(3, 10, 64), cells_left_masked(3, 10, 10), 0]


def test_bidirectional_attention(mlm):
    sub = torch.randint(0, 16, (1, 16, 2))
    changed = sub.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 16
    assert not torch.allclose(mlm(torch.tensor([0]), sub)[:, 1], mlm(torch.tensor([0]), changed)[:, 1])


def test_maskgit_reveals_on_schedule_and_never_changes_known_cells(mlm, monkeypatch):
    seen = record_inputs(mlm, monkeypatch)
    cfg = SampleConfig(steps=6, guidance_scale=1.0)
    out = generate(mlm, torch.tensor([0, 1, 2]), cfg, seeds=[1, 2, 3])
    assert len(seen) == 6 and out.shape == (3, 16, 2) and out.max() < 16
    masked_per_step = [(sub == mlm.mask_index).all(-1).sum(-1).tolist() for _, sub in seen]
    assert masked_per_step == [[16] * 3] + [[cells_left_masked(t, 6, 16)] * 3 for t in range(5)]
    for _, sub in seen:  # sub-codes of a cell are masked together, and known cells keep their codes
        partly = (sub == mlm.mask_index).any(-1) & ~(sub == mlm.mask_index).all(-1)
        assert not partly.any()
        known = ~(sub == mlm.mask_index).all(-1)
        assert torch.equal(sub[known], out[known])


def test_guidance_doubles_the_batch_and_changes_samples(mlm, monkeypatch):
    seen = record_inputs(mlm, monkeypatch)
    labels = torch.tensor([0, 1])
    guided = generate(mlm, labels, SampleConfig(steps=4, guidance_scale=4.0), seeds=[5, 6])
    assert seen[0][0].tolist() == [0, 1, 3, 3]  # conditional rows, then the null class
    plain = generate(mlm, labels, SampleConfig(steps=4, guidance_scale=1.0), seeds=[5, 6])
    assert seen[-1][0].tolist() == [0, 1]
    assert not torch.equal(guided, plain)


def test_temperature_and_noise(mlm):
    labels = torch.tensor([0, 1])
    greedy = SampleConfig(steps=4, temperature=0.0, mask_noise=0.0, guidance_scale=2.0)
    assert torch.equal(generate(mlm, labels, greedy, [1, 2]), generate(mlm, labels, greedy, [3, 4]))
    hot = SampleConfig(steps=4, temperature=1.0, guidance_scale=2.0)
    assert not torch.equal(generate(mlm, labels, hot, [1, 2]), generate(mlm, labels, hot, [3, 4]))
    assert torch.equal(generate(mlm, labels, hot, [1, 2]), generate(mlm, labels, hot, [1, 2]))


def test_mlm_loss_counts_only_masked_cells(mlm, monkeypatch):
    labels, sub = torch.tensor([0, 1, 2, 0]), torch.randint(0, 16, (4, 16, 2))
    forward = mlm.forward
    seen = record_inputs(mlm, monkeypatch)
    loss = mlm_loss(mlm, labels, sub)
    x = seen[0][1]
    masked = (x == mlm.mask_index).all(-1)
    assert torch.equal(masked, (x == mlm.mask_index).any(-1))  # whole cells are masked
    assert masked.sum(-1).min() >= 1 and torch.equal(x[~masked], sub[~masked])
    logits = forward(labels, x)[:, 1:]
    expected = torch.nn.functional.cross_entropy(logits[masked].flatten(0, 1), sub[masked].flatten())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_inpainting_keeps_known_cells_exactly(mlm, monkeypatch):
    seen = record_inputs(mlm, monkeypatch)
    known_sub = torch.randint(0, 16, (2, 16, 2))
    known = torch.zeros(2, 16, dtype=torch.bool)
    known[0, :10] = True  # image 0: top part known; image 1: a 2x2 hole in a known image
    known[1] = True
    known[1, [5, 6, 9, 10]] = False
    out = generate_mlm(mlm, torch.tensor([0, 1]), SampleConfig(steps=4, guidance_scale=1.0), [1, 2], known_sub, known)
    assert torch.equal(out[known], known_sub[known])
    assert out.max() < 16
    first = seen[0][1]
    assert (first[0, 10:] == mlm.mask_index).all() and torch.equal(first[0, :10], known_sub[0, :10])
    masked_per_step = [(sub == mlm.mask_index).all(-1).sum(-1).tolist() for _, sub in seen]
    assert masked_per_step[0] == [6, 4]
    assert masked_per_step[1:] == [[cells_left_masked(t, 4, 6), cells_left_masked(t, 4, 4)] for t in range(3)]


def test_the_step_hook_sees_every_maskgit_step_and_changes_nothing(mlm):
    labels, seeds, cfg = torch.tensor([0, 1]), [3, 4], SampleConfig(steps=5, guidance_scale=2.0)
    steps = []
    out = generate(mlm, labels, cfg, seeds, on_step=lambda t, sub, done: steps.append((t, sub.clone(), done.clone())))
    assert torch.equal(out, generate(mlm, labels, cfg, seeds))
    assert [t for t, _, _ in steps] == list(range(5))
    revealed = [done.sum(-1) for _, _, done in steps]
    assert all((a <= b).all() for a, b in zip(revealed, revealed[1:], strict=False)) and steps[-1][2].all()
    for _, sub, done in steps:  # revealed cells are final; the rest still carry the mask
        assert torch.equal(sub[done], out[done]) and (sub[~done] == mlm.mask_index).all()

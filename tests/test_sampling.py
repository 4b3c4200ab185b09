import math

import numpy as np
import pytest
import torch
from PIL import Image

from elmgen.errors import ElmgenError
from elmgen.models import ModelConfig, Transformer, preset
from elmgen.sampling import (
    SampleConfig,
    apply_guidance,
    class_balanced,
    generate,
    generate_ar,
    image_seeds,
    outpaint_ar,
    sample_logits,
    top_k_filter,
    top_p_filter,
    window_starts,
    write_samples,
)
from elmgen.schedules import guidance_scale_at, temperature_at


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[0.1, 2.0, -1.0, 3.0, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]])
    kept = torch.isfinite(top_k_filter(logits, 2))
    assert kept.tolist() == [[False, True, False, True, False], [True, True, False, False, False]]
    assert torch.equal(top_k_filter(logits, 0), logits)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
    logits = probs.log()
    keep = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()  # noqa: E731
    assert keep(0.5) == [True, False, False, False]
    assert keep(0.6) == [True, False, True, False]
    assert keep(0.79) == [True, False, True, False]
    assert keep(0.81) == [True, False, True, True]
    assert keep(0.01) == [True, False, False, False]
    assert keep(1.0) == [True] * 4


def test_filtered_draws_stay_inside_the_kept_set():
    logits = torch.randn(4, 2, 50)
    allowed = torch.isfinite(top_p_filter(top_k_filter(logits, 7), 0.6))
    for _ in range(50):
        draw = sample_logits(logits, 1.0, 7, 0.6, torch.rand(4, 2))
        assert allowed.gather(-1, draw[..., None]).all()


def test_inverse_cdf_draws_follow_the_distribution():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    draws = sample_logits(probs.log().expand(20000, 4), 1.0, 0, 1.0, torch.rand(20000))
    freq = torch.bincount(draws, minlength=4) / 20000
    assert freq[1] == 0 and torch.allclose(freq, probs, atol=0.015)
    edges = sample_logits(probs.log().expand(3, 4), 1.0, 0, 1.0, torch.tensor([0.0, 0.7, 0.999999]))
    assert edges.tolist() == [0, 2, 3]


def test_image_seeds_never_repeat_within_a_class():
    labels, index = class_balanced(list(range(10)), 2)
    seeds = image_seeds(0, labels, index)
    assert labels.tolist() == [c for c in range(10) for _ in range(2)] and index.tolist() == [0, 1] * 10
    for c in range(10):
        in_class = [s for s, lab in zip(seeds, labels.tolist(), strict=True) if lab == c]
        assert len(set(in_class)) == len(in_class) == 2
    assert image_seeds(0, labels[4:6], index[4:6]) == seeds[4:6]  # a shard gets the same seeds
    assert image_seeds(1, labels, index) != seeds


def test_the_png_previews_the_first_rows_and_columns_and_the_npz_keeps_every_image(tmp_path):
    labels = torch.arange(40).repeat_interleave(20)  # 40 classes of 20: more than the preview's 32 x 16
    value_N = (labels + torch.arange(20).repeat(40)).to(torch.uint8)  # class + index in the class
    images = value_N[:, None, None, None].expand(-1, 1, 2, 2).contiguous()
    png, npz = write_samples(images, labels, list(range(800)), tmp_path, ncols=20)
    grid = np.asarray(Image.open(png))[::2, ::2]  # drawn twice as large
    assert grid.shape == (32 * 4 + 2, 16 * 4 + 2)  # 2-pixel images, 2 pixels of padding
    assert grid[2 + 4 * 5, 2 + 4 * 3] == 5 + 3  # row 5 is class 5, column 3 its image 3
    assert np.load(npz)["arr_0"].shape == (800, 2, 2, 1)


def test_greedy_and_guidance_rules():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    assert sample_logits(logits, 0.0, 0, 1.0, torch.rand(1)).tolist() == [1]
    cond, uncond = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    assert apply_guidance(cond, uncond, 3.0).tolist() == [4.0, -2.0]
    assert [guidance_scale_at(t, 4, 5.0, "linear") for t in range(4)] == [2.0, 3.0, 4.0, 5.0]
    assert guidance_scale_at(0, 4, 5.0, "constant") == 5.0
    with pytest.raises(ElmgenError):
        SampleConfig(guidance_schedule="exponential").validate()


def test_more_guidance_schedules_interval_and_temperature_ramp():
    cosine = [guidance_scale_at(t, 4, 5.0, "cosine") for t in range(4)]
    assert cosine == pytest.approx([1 + 4 * (1 - math.cos(math.pi * p)) / 2 for p in (0.25, 0.5, 0.75, 1.0)])
    assert cosine[1] == pytest.approx(3.0) and cosine[-1] == pytest.approx(5.0)
    assert [guidance_scale_at(t, 4, 5.0, "power", power=2) for t in range(4)] == [1.25, 2.0, 3.25, 5.0]
    assert [guidance_scale_at(t, 4, 5.0, "constant", interval=(0.5, 0.75)) for t in range(4)] == [1.0, 5.0, 5.0, 1.0]
    assert [temperature_at(t, 5, 1.0, 0.2) for t in range(5)] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    assert temperature_at(3, 5, 0.7, None) == 0.7
    with pytest.raises(ElmgenError, match="guidance_interval"):
        SampleConfig(guidance_interval=[0.8, 0.2]).validate()


def test_guidance_outside_its_interval_is_off(model):
    labels, seeds = torch.tensor([0, 1]), [3, 4]
    off = generate(model, labels, SampleConfig(guidance_scale=1.0), seeds)
    empty = generate(model, labels, SampleConfig(guidance_scale=6.0, guidance_interval=[0.0, 0.0]), seeds)
    assert torch.equal(off, empty)
    assert not torch.equal(off, generate(model, labels, SampleConfig(guidance_scale=6.0), seeds))


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(**preset("micro"), vocab="2-5", grid_size=4, num_classes=3))
    torch.nn.init.normal_(m.head.weight, std=0.3)
    return m.eval()


@pytest.mark.parametrize(
    "cfg",
    [
        SampleConfig(temperature=0.0, guidance_scale=1.0),
        SampleConfig(temperature=0.0, guidance_scale=4.0, guidance_schedule="constant"),
        SampleConfig(temperature=1.0, guidance_scale=1.0),
        SampleConfig(temperature=1.0, guidance_scale=3.0, guidance_schedule="linear", top_k=10),
        SampleConfig(temperature=0.7, guidance_scale=2.0, top_p=0.8),
    ],
)
def test_kv_cache_gives_exactly_the_tokens_of_recomputation(model, cfg):
    labels = torch.tensor([0, 1, 2, 1])
    cached = generate(model, labels, cfg, seeds=[7, 8, 9, 10])
    cfg.kv_cache = False
    full = generate(model, labels, cfg, seeds=[7, 8, 9, 10])
    assert cached.shape == (4, 16, 2)
    assert torch.equal(cached, full)


def test_cpu_bf16_decoding_computes_on_reordered_weights_and_leaves_the_model_as_it_was(model, monkeypatch):
    """Eager bf16 AR decoding on a CPU with native bf16 runs its linear layers on oneDNN-reordered bfloat16
    copies of the weights (elmgen.models.packed); fp32 decoding, and bf16 on other CPUs, do not; the layers are
    restored after decoding, also when it stops half-way."""
    from elmgen.models import packed

    calls, reordered = [], packed._packed_linear
    monkeypatch.setattr(packed, "_packed_linear", lambda *a: calls.append(1) or reordered(*a))
    labels, seeds = torch.tensor([0, 1, 2, 1]), [7, 8, 9, 10]
    generate(model, labels, SampleConfig(guidance_scale=2.0), seeds)
    assert not calls
    cfg = SampleConfig(guidance_scale=2.0, precision="bf16")
    generate(model, labels, cfg, seeds)
    if packed.can_pack("cpu", torch.bfloat16):
        assert len(calls) >= 16 * sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    else:
        assert not calls

    def stop(t, *_):
        if t == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate(model, labels, cfg, seeds, on_step=stop)
    assert not any("forward" in vars(m) for m in model.modules())
    calls.clear()
    model(labels, torch.zeros(4, 3, 2, dtype=torch.long))
    assert not calls


def test_seed_reproduces_and_changes_samples(model):
    cfg, labels = SampleConfig(), torch.tensor([0, 1, 2])
    a = generate(model, labels, cfg, [1, 2, 3])
    assert torch.equal(a, generate(model, labels, cfg, [1, 2, 3]))
    assert not torch.equal(a, generate(model, labels, cfg, [4, 2, 3]))
    assert torch.equal(a[1:], generate(model, labels[1:], cfg, [2, 3]))  # batch-independent


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_tokens(model):
    """The GPU fast path (torch.compile of the static-shape decode step) runs on the CPU too."""
    labels, seeds = torch.tensor([0, 1, 2]), [1, 2, 3]
    eager = generate(model, labels, SampleConfig(top_k=12), seeds)
    compiled = generate(model, labels, SampleConfig(top_k=12, compile=True), seeds)
    assert torch.equal(eager, compiled)


def test_window_starts_cover_the_canvas_and_end_at_its_edge():
    assert window_starts(8, 8, 4) == [0]
    assert window_starts(16, 8, 4) == [0, 4, 8]
    assert window_starts(10, 8, 8) == [0, 2]
    assert window_starts(12, 4, 3) == [0, 3, 6, 8]


def test_known_cells_are_fed_not_sampled(model):
    labels, seeds = torch.tensor([0, 2]), [5, 6]
    free = generate(model, labels, SampleConfig(), seeds)
    known_BL = torch.zeros(2, 16, dtype=torch.bool)
    known_BL[:, 4:8] = True
    given = torch.randint(0, 32, free.shape)
    out = generate_ar(model, labels, SampleConfig(), seeds, given, known_BL)
    assert torch.equal(out[:, 4:8], given[:, 4:8])
    assert torch.equal(out[:, :4], free[:, :4])  # cells before the known ones are untouched
    assert not torch.equal(out[:, 8:], free[:, 8:])  # later cells are conditioned on the fed ones


def test_outpainting_extends_the_trained_grid(model):
    labels, seeds, cfg = torch.tensor([0, 1, 2]), [1, 2, 3], SampleConfig(top_k=12)
    wide = outpaint_ar(model, labels, cfg, seeds, height=4, width=10, stride=2)
    assert wide.shape == (3, 40, 2)
    canvas = wide.view(3, 4, 10, 2)
    # The first window is ordinary generation with the same seeds; the rest is new.
    assert torch.equal(canvas[:, :, :4].reshape(3, 16, 2), generate(model, labels, cfg, seeds))
    assert not torch.equal(canvas[:, :, 6:], canvas[:, :, :4])
    tall = outpaint_ar(model, labels, cfg, seeds, height=6, width=4, stride=2)
    assert torch.equal(tall[:, :16], generate(model, labels, cfg, seeds))
    with pytest.raises(ElmgenError, match="at least 4x4"):
        outpaint_ar(model, labels, cfg, seeds, height=3, width=8, stride=2)


def test_bf16_kv_decoding_tracks_the_fp32_logits(model):
    """Teacher-forced through the bfloat16 KV cache under autocast, the logits stay close to fp32."""
    from elmgen.device import autocast

    labels, seeds = torch.tensor([0, 1, 2, 1]), [7, 8, 9, 10]
    sub = generate(model, labels, SampleConfig(), seeds)
    full = model(labels, sub[:, :-1])
    caches = model.new_caches(4, torch.bfloat16)
    with torch.no_grad(), autocast(torch.device("cpu"), "bf16"):
        steps = [model(labels, sub[:, :0], caches)[:, -1]]
        steps += [model.decode_step(sub[:, t - 1 : t], torch.tensor([t]), caches)[:, -1] for t in range(1, 16)]
    assert caches[0].k.dtype == torch.bfloat16
    error = (torch.stack(steps, 1).float() - full).abs().max() / full.abs().max()
    assert error < 0.03, error  # measured 0.007
    bf16 = SampleConfig(precision="bf16")
    assert torch.equal(generate(model, labels, bf16, seeds), generate(model, labels, bf16, seeds))
    with pytest.raises(ElmgenError, match="precision"):
        generate(model, labels, SampleConfig(precision="fp16"), seeds)


@pytest.mark.parametrize("kind", ["ar", "mlm"])
def test_bf16_linears_sample_what_bf16_autocast_samples_with_half_the_weight_bytes(kind):
    """`elmgen sample --precision bf16` keeps the linear weights in bfloat16 (no fp32 copy beside autocast's):
    the same tokens as autocast over fp32 weights, fewer bytes."""
    import copy

    torch.manual_seed(0)
    fp32 = Transformer(ModelConfig(**preset("micro"), kind=kind, vocab="2-5", grid_size=4, num_classes=3)).eval()
    torch.nn.init.normal_(fp32.head.weight, std=0.3)
    half = copy.deepcopy(fp32).bf16_linears()
    labels, seeds, cfg = torch.tensor([0, 1, 2, 1]), [7, 8, 9, 10], SampleConfig(precision="bf16", steps=4)
    assert torch.equal(generate(half, labels, cfg, seeds), generate(fp32, labels, cfg, seeds))
    weight_bytes = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    linear = sum(m.weight.numel() for m in fp32.modules() if isinstance(m, torch.nn.Linear))
    assert weight_bytes(fp32) - weight_bytes(half) == 2 * linear
    assert half.tok_emb.weight.dtype == half.norm.weight.dtype == torch.float32


def test_the_step_hook_sees_every_cell_and_changes_nothing(model):
    labels, seeds, cfg = torch.tensor([0, 2]), [5, 6], SampleConfig(guidance_scale=2.0)
    steps = []
    out = generate(model, labels, cfg, seeds, on_step=lambda t, sub, done: steps.append((t, sub.clone(), done)))
    assert torch.equal(out, generate(model, labels, cfg, seeds))
    assert [t for t, _, _ in steps] == list(range(16))
    for t, sub, done in steps:  # the raster fills in: cells 0..t final, equal to the finished image's
        assert done.shape == (2, 16) and done[:, : t + 1].all() and not done[:, t + 1 :].any()
        assert torch.equal(sub[:, : t + 1], out[:, : t + 1])

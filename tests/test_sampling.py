import pytest
import torch

from elmgen.errors import ElmgenError
from elmgen.model import ModelConfig, Transformer, preset
from elmgen.sampling import (
    SampleConfig,
    apply_cfg,
    cfg_scale_at,
    generate,
    sample_logits,
    top_k_filter,
    top_p_filter,
)


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
    g = torch.Generator().manual_seed(0)
    allowed = torch.isfinite(top_p_filter(top_k_filter(logits, 7), 0.6))
    for _ in range(50):
        draw = sample_logits(logits, 1.0, 7, 0.6, g)
        assert allowed.gather(-1, draw[..., None]).all()


def test_greedy_and_cfg_rules():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    assert sample_logits(logits, 0.0, 0, 1.0).tolist() == [1]
    cond, uncond = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    assert apply_cfg(cond, uncond, 3.0).tolist() == [4.0, -2.0]
    assert [cfg_scale_at(t, 4, 5.0, "linear") for t in range(4)] == [2.0, 3.0, 4.0, 5.0]
    assert cfg_scale_at(0, 4, 5.0, "constant") == 5.0
    with pytest.raises(ElmgenError):
        SampleConfig(cfg_schedule="cosine").validate()


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(**preset("micro"), vocab="2-5", grid_size=4, num_classes=3))
    torch.nn.init.normal_(m.head.weight, std=0.3)
    return m.eval()


@pytest.mark.parametrize("cfg", [
    SampleConfig(temperature=0.0, cfg_scale=1.0),
    SampleConfig(temperature=0.0, cfg_scale=4.0, cfg_schedule="constant"),
    SampleConfig(temperature=1.0, cfg_scale=1.0),
    SampleConfig(temperature=1.0, cfg_scale=3.0, cfg_schedule="linear", top_k=10),
    SampleConfig(temperature=0.7, cfg_scale=2.0, top_p=0.8),
])
def test_kv_cache_gives_exactly_the_tokens_of_recomputation(model, cfg):
    labels = torch.tensor([0, 1, 2, 1])
    cached = generate(model, labels, cfg, torch.Generator().manual_seed(7))
    cfg.kv_cache = False
    full = generate(model, labels, cfg, torch.Generator().manual_seed(7))
    assert cached.shape == (4, 16, 2)
    assert torch.equal(cached, full)


def test_seed_reproduces_and_changes_samples(model):
    cfg, labels = SampleConfig(), torch.tensor([0, 1])
    a = generate(model, labels, cfg, torch.Generator().manual_seed(1))
    b = generate(model, labels, cfg, torch.Generator().manual_seed(1))
    c = generate(model, labels, cfg, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)

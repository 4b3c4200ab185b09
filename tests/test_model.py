import pytest
import torch

from elmgen.errors import ElmgenError
from elmgen.models import ModelConfig, Transformer, count_params, preset


def random_model(**overrides) -> Transformer:
    cfg = ModelConfig(**{**preset("micro"), "vocab": "2-4", "grid_size": 4, "num_classes": 3, **overrides})
    model = Transformer(cfg)
    torch.nn.init.normal_(model.head.weight, std=0.5)  # zero-initialised head would hide differences
    return model.eval()


@pytest.mark.parametrize(
    "name,vocab,expected",
    [
        ("L", "2-10", 315e6),
        ("XL", "2-12", 757e6),
        ("XXL", "2-12", 1.4e9),
        ("2B", "2-12", 1.9e9),
    ],
)
def test_paper_sizes(name, vocab, expected):
    cfg = ModelConfig(**preset(name), vocab=vocab, grid_size=16, num_classes=1000)
    assert abs(count_params(cfg) / expected - 1) < 0.03


def test_count_params_matches_a_built_model():
    cfg = ModelConfig(**preset("micro"), vocab="2-6", grid_size=4, num_classes=5)
    assert count_params(cfg) == sum(p.numel() for p in Transformer(cfg).parameters())


def test_zero_initialised_heads_give_uniform_loss():
    model = Transformer(ModelConfig(**preset("micro"), vocab="2-5", grid_size=3, num_classes=2))
    logits = model(torch.tensor([0, 1]), torch.randint(0, 32, (2, 8, 2)))
    assert logits.shape == (2, 9, 2, 32)
    assert torch.count_nonzero(logits) == 0


def test_causal_future_cells_do_not_change_past_logits():
    model = random_model()
    sub = torch.randint(0, 16, (2, 15, 2))
    changed = sub.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % 16
    a, b = model(torch.tensor([0, 2]), sub), model(torch.tensor([0, 2]), changed)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)  # positions 0..9 see cells < 9 only
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_class_label_and_every_sub_code_matter():
    model = random_model()
    sub = torch.randint(0, 16, (1, 15, 2))
    base = model(torch.tensor([0]), sub)
    assert not torch.allclose(base, model(torch.tensor([1]), sub))
    for j in range(2):
        changed = sub.clone()
        changed[0, 0, j] = (changed[0, 0, j] + 1) % 16
        assert not torch.allclose(base[:, 2:], model(torch.tensor([0]), changed)[:, 2:])


def test_kv_cache_matches_full_forward():
    model = random_model()
    labels, sub = torch.tensor([0, 1, 2]), torch.randint(0, 16, (3, 15, 2))
    full = model(labels, sub)
    caches = model.new_caches(3)
    steps = [model(labels, sub[:, :0], caches)]
    steps += [model.decode_step(sub[:, t : t + 1], torch.tensor([t + 1]), caches) for t in range(15)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_2d_rope_sees_rows_and_columns():
    """Swapping two cells in the same row must change attention: positions are encoded."""
    model = random_model(vocab="1-4")
    sub = torch.randint(0, 16, (1, 15, 1))
    swapped = sub.clone()
    swapped[0, [1, 2]] = sub[0, [2, 1]]
    assert not torch.allclose(model(torch.tensor([0]), sub)[:, -1], model(torch.tensor([0]), swapped)[:, -1])


def test_class_dropout_uses_null_class_only_in_training():
    model = random_model(class_dropout=1.0)
    sub = torch.randint(0, 16, (2, 15, 2))
    null_logits = model(torch.tensor([2, 2]), sub)  # eval: labels kept
    model.train()
    dropped = model(torch.tensor([0, 1]), sub)
    model.eval()
    assert torch.allclose(dropped, model(torch.tensor([3, 3]), sub))
    assert not torch.allclose(dropped, null_logits)


def test_invalid_config_is_a_clear_error():
    with pytest.raises(ElmgenError, match="divisible by n_head"):
        Transformer(ModelConfig(d_model=100, n_head=3))
    with pytest.raises(ElmgenError, match="unknown preset"):
        preset("XXXL")


def test_flops_formula_matches_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from elmgen.models import flops_per_token

    cfg = ModelConfig(n_layer=2, d_model=128, n_head=2, vocab="2-6", grid_size=8, num_classes=3, kind="mlm")
    model = Transformer(cfg).eval()
    sub = torch.randint(0, 64, (2, cfg.num_cells, 2))
    with FlopCounterMode(display=False) as counter:
        model(torch.tensor([0, 1]), sub)
    per_position = counter.get_total_flops() / (2 * (cfg.num_cells + 1))
    flops = flops_per_token(cfg)
    assert per_position == pytest.approx(flops["matmul"], rel=0.01)  # the CPU counter skips fused attention
    assert flops["attention"] == 4 * 2 * 64 * 128 and flops["forward"] == flops["matmul"] + flops["attention"]


def test_memory_estimate_orders():
    from elmgen.models import training_memory_gb

    cfg = ModelConfig(**preset("XL"), vocab="2-12", grid_size=16, num_classes=1000)
    ddp = training_memory_gb(cfg, 32, 8)
    assert training_memory_gb(cfg, 32, 8, sharded=True) < ddp
    assert training_memory_gb(cfg, 32, 8, activation_checkpointing=True) < ddp
    assert training_memory_gb(cfg, 64, 8) > ddp
    assert ddp > count_params(cfg) * 16 / 1e9  # at least the optimizer states


def test_codes_outside_a_smaller_code_space_are_never_predicted():
    cfg = ModelConfig(**preset("micro"), vocab="1-4", grid_size=2, num_classes=2, num_codes=10)
    model = Transformer(cfg)
    torch.nn.init.normal_(model.head.weight, std=0.5)
    logits = model(torch.tensor([0]), torch.randint(0, 10, (1, 3, 1)))
    assert torch.isinf(logits[..., 10:]).all() and torch.isfinite(logits[..., :10]).all()
    with pytest.raises(ElmgenError, match="use vocabulary 1-4"):
        Transformer(ModelConfig(**preset("micro"), vocab="2-2", grid_size=2, num_classes=2, num_codes=10))


@pytest.mark.parametrize("kind", ["ar", "mlm"])
def test_the_loss_in_chunks_is_the_loss_and_gradient_of_the_whole_batch(kind, monkeypatch):
    import elmgen.models.transformer as transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(**preset("micro"), vocab="2-4", grid_size=4, num_classes=3, kind=kind)).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)  # eval: no class dropout, the same loss at every call
    labels, sub = torch.tensor([0, 2, 1]), torch.randint(0, 16, (3, 16, 2))
    x = sub[:, :-1] if kind == "ar" else sub.masked_fill(torch.rand(3, 16, 1) < 0.5, model.mask_index)
    scored = None if kind == "ar" else x[..., 0] == model.mask_index

    def loss_and_grads():
        model.zero_grad()
        loss = model(labels, x, targets_BLn=sub, scored_BL=scored)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    whole, whole_grads = loss_and_grads()
    logits = model(labels, x)
    logits_BLnV = logits if kind == "ar" else logits[:, 1:]
    rows = torch.ones(3, 16, dtype=torch.bool) if scored is None else scored
    expected = torch.nn.functional.cross_entropy(logits_BLnV[rows].flatten(0, 1), sub[rows].flatten())
    assert whole.item() == pytest.approx(expected.item(), rel=1e-6)
    monkeypatch.setattr(transformer, "LOGITS_CHUNK", 5 * 2 * 16)  # 5 cells a chunk: 10 chunks of 48 AR cells
    chunked, chunked_grads = loss_and_grads()
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-6)
    assert len(chunked_grads) == len(whole_grads)
    for a, b in zip(chunked_grads, whole_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

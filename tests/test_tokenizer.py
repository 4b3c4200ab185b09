import numpy as np
import pytest
import torch

from elmgen.errors import ElmgenError
from elmgen.evaluation import bit_stats, code_usage, psnr
from elmgen.tokenizer import BinaryAutoencoder, TokenizerConfig, binarize

SMALL = dict(base_width=16, channel_mult=[1, 2], num_res_blocks=1, latent_dim=16, num_bits=12)


def test_shapes_and_binary_codes():
    model = BinaryAutoencoder(TokenizerConfig(in_channels=3, **SMALL)).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    bits = model.encode(x)
    assert bits.shape == (2, 12, 16, 16)
    assert set(bits.unique().tolist()) <= {0.0, 1.0}
    assert model.decode(bits).shape == x.shape


def test_straight_through_gradient_reaches_encoder():
    for mode in ("bernoulli", "deterministic"):
        model = BinaryAutoencoder(TokenizerConfig(**SMALL, binarization=mode))
        recon, probs, bits = model(torch.rand(2, 1, 16, 16) * 2 - 1)
        recon.pow(2).mean().backward()
        first_conv = model.encoder.net[0].weight
        assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0, mode
        assert set(bits.detach().unique().tolist()) <= {0.0, 1.0}


def test_binarize_modes():
    probs = torch.tensor([0.1, 0.6, 0.9, 0.4])
    assert binarize(probs, "deterministic").tolist() == [0.0, 1.0, 1.0, 0.0]
    draws = torch.stack([binarize(torch.full((1000,), 0.3), "bernoulli") for _ in range(20)])
    assert abs(draws.mean().item() - 0.3) < 0.02


def test_bad_input_shape_is_a_clear_error():
    model = BinaryAutoencoder(TokenizerConfig(**SMALL))
    with pytest.raises(ElmgenError, match="expects images"):
        model.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ElmgenError, match="binarization"):
        BinaryAutoencoder(TokenizerConfig(**{**SMALL, "num_bits": 8}, binarization="random"))


def test_metrics_on_hand_made_cases():
    cells = np.array([[0, 1, 1, 3], [3, 3, 0, 0]])
    assert code_usage(cells, bits=2) == {"distinct_codes": 3, "code_usage": 0.75}
    assert code_usage(cells, bits=8)["code_usage"] == 3 / 8  # min(2^8, 8 cells)
    stats = bit_stats(np.array([[0, 1], [1, 1], [0, 1], [1, 1]]))
    assert stats["bit_mean"] == [0.5, 1.0]
    assert stats["bit_entropy"] == pytest.approx(0.5)  # entropies 1 and 0
    x = torch.zeros(1, 1, 4, 4)
    assert psnr(x, x + 0.2).item() == pytest.approx(10 * np.log10(4 / 0.04), rel=1e-5)

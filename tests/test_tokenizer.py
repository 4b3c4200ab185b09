import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from elmgen.errors import ElmgenError
from elmgen.evaluation import bit_stats, code_usage, evaluate_tokenizer, psnr, ssim, subcode_usage
from elmgen.tokenizers import Autoencoder, TokenizerConfig, binarize
from elmgen.vocab import Vocab

SMALL = dict(base_width=16, channel_mult=[1, 2], num_res_blocks=1, latent_dim=16, num_bits=12)


@pytest.mark.parametrize("quantizer", ["bae", "vq", "fsq"])
def test_codes_round_trip_through_the_interface(quantizer):
    model = Autoencoder(TokenizerConfig(in_channels=3, **SMALL, quantizer=quantizer)).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    cells = model.encode_cells(x)
    assert cells.shape == (2, 256) and cells.dtype == torch.int64
    assert 0 <= cells.min() and cells.max() < model.num_codes <= 2**model.code_bits
    recon, q = model(x)
    if quantizer != "bae":  # the BAE trains on Bernoulli draws; the others are deterministic
        assert torch.equal(q.cells_BL, cells)
        assert torch.allclose(model.decode_cells(cells, 16), recon, atol=1e-5)
    assert model.decode_cells(cells, 16).shape == x.shape


@pytest.mark.parametrize(
    "quantizer,mode", [("bae", "bernoulli"), ("bae", "deterministic"), ("vq", None), ("fsq", None)]
)
def test_straight_through_gradient_reaches_encoder(quantizer, mode):
    cfg = TokenizerConfig(**SMALL, quantizer=quantizer, **({"binarization": mode} if mode else {}))
    model = Autoencoder(cfg)
    recon, q = model(torch.rand(2, 1, 16, 16) * 2 - 1)
    (recon.pow(2).mean() + q.loss).backward()
    first_conv = model.encoder.net[0].weight
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0


def test_binarize_modes():
    probs = torch.tensor([0.1, 0.6, 0.9, 0.4])
    assert binarize(probs, "deterministic").tolist() == [0.0, 1.0, 1.0, 0.0]
    draws = torch.stack([binarize(torch.full((1000,), 0.3), "bernoulli") for _ in range(20)])
    assert abs(draws.mean().item() - 0.3) < 0.02
    channels_last = torch.rand(2, 16, 4, 4).contiguous(memory_format=torch.channels_last)  # as a CPU conv may give
    for mode in ("deterministic", "bernoulli"):  # the decoder gets the layout its group norms are fast in
        assert binarize(channels_last, mode).is_contiguous()


def test_bad_input_and_config_are_clear_errors():
    model = Autoencoder(TokenizerConfig(**SMALL))
    with pytest.raises(ElmgenError, match="expects images"):
        model.encode_cells(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ElmgenError, match="binarization"):
        Autoencoder(TokenizerConfig(**{**SMALL, "num_bits": 8}, binarization="random"))
    with pytest.raises(ElmgenError, match="quantizer must be one of bae, vq, fsq"):
        Autoencoder(TokenizerConfig(**SMALL, quantizer="lfq"))
    with pytest.raises(ElmgenError, match="fsq_levels"):
        Autoencoder(TokenizerConfig(**SMALL, quantizer="fsq", fsq_levels=[4, 1]))


def test_metrics_on_hand_made_cases():
    cells = np.array([[0, 1, 1, 3], [3, 3, 0, 0]])
    usage = code_usage(cells, num_codes=4)
    assert (usage["distinct_codes"], usage["code_usage"]) == (3, 0.75)
    p = np.array([3, 2, 3]) / 8  # counts of codes 0, 1, 3
    assert usage["perplexity"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    assert code_usage(cells, num_codes=256)["code_usage"] == 3 / 8  # min(256 codes, 8 cells)
    assert subcode_usage(cells, Vocab.parse("2-1")) == [1.0, 1.0]  # codes 00, 01, 11
    assert subcode_usage(np.array([0, 1, 1]), Vocab.parse("2-1")) == [0.5, 1.0]  # codes 00, 01
    stats = bit_stats(np.array([[0, 1], [1, 1], [0, 1], [1, 1]]))
    assert stats["bit_mean"] == [0.5, 1.0] and stats["bit_entropies"] == [1.0, 0.0]
    assert stats["bit_entropy"] == pytest.approx(0.5)
    x = torch.zeros(1, 1, 4, 4)
    assert psnr(x, x + 0.2).item() == pytest.approx(10 * np.log10(4 / 0.04), rel=1e-5)


def test_ssim_matches_scikit_image():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(2, 3, 24, 24)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.3, size=x.shape), -1, 1).astype(np.float32)
    ours = ssim(torch.from_numpy(x), torch.from_numpy(y))
    for i in range(2):
        ref = structural_similarity(
            x[i], y[i], channel_axis=0, data_range=2.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
        assert ours[i].item() == pytest.approx(ref, abs=1e-5)
    assert ssim(torch.from_numpy(x), torch.from_numpy(x)).tolist() == pytest.approx([1.0, 1.0])


class FixedCodes(torch.nn.Module):
    """A stand-in tokenizer whose 2x2 grid of 4-bit codes is written in each image's top-left pixels."""

    def __init__(self):
        super().__init__()
        self.cfg = TokenizerConfig(channel_mult=[1, 2], num_bits=4)
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.code_bits, self.num_codes, self.default_vocab = 4, 16, Vocab.parse("2-2")

    def encode_cells(self, x):
        return x[:, 0, 0, :4].round().long()

    def decode_cells(self, cells, grid):
        return torch.zeros(cells.shape[0], 1, 2 * grid, 2 * grid)


class Images:
    name, class_names = "fixed", ["a"]

    def __init__(self, cells):
        self.cells = torch.tensor(cells, dtype=torch.float32)
        self.labels = np.zeros(len(cells), dtype=np.int64)

    def __len__(self):
        return len(self.cells)

    def images(self, idx):
        out = torch.zeros(len(idx), 1, 4, 4)
        out[:, 0, 0, :4] = self.cells[idx]
        return out.add(1).mul(127.5)  # to_float maps these back to the cell values


def test_usage_statistics_of_evaluate_tokenizer_by_hand():
    # 8 cells: codes 0b0000 x3, 0b1111 x2, 0b1010, 0b0101, 0b1000 -> 5 of 16 codes.
    report = evaluate_tokenizer(FixedCodes(), Images([[0, 0, 0, 15], [15, 10, 5, 8]]))
    assert report["distinct_codes"] == 5 and report["code_usage"] == 5 / 8  # min(16 codes, 8 cells)
    counts = np.array([3, 2, 1, 1, 1]) / 8
    assert report["perplexity"] == pytest.approx(np.exp(-(counts * np.log(counts)).sum()))
    # first sub-code (top 2 bits): 00 x3, 11 x2, 10, 01, 10 -> 4 of 4; second: 00 x4, 11 x2, 10, 01 -> 4 of 4
    assert report["vocab"] == "2-2" and report["subcode_usage"] == [1.0, 1.0]
    assert report["bit_mean"] == [0.5, 0.375, 0.375, 0.375]  # bit 1 (MSB) set in 15, 15, 10, 8
    h = lambda p: -(p * np.log2(p) + (1 - p) * np.log2(1 - p))  # noqa: E731
    assert report["bit_entropies"] == pytest.approx([1.0, h(0.375), h(0.375), h(0.375)], abs=1e-4)
    assert evaluate_tokenizer(FixedCodes(), Images([[0, 1, 2, 3]]), vocab=Vocab.parse("4-1"))["subcode_usage"] == [
        0.5,
        0.5,
        1.0,
        1.0,
    ]

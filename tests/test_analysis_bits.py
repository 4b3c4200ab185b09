import math
from types import SimpleNamespace

import pytest
import torch

from elmgen.analysis import bit_cross_entropy, flip_costs
from elmgen.vocab import Vocab, cells_to_subcodes


class OnlyTopBit:
    """A 4-bit tokenizer whose decoder paints each 2x2 cell with its most significant bit (bit 0) alone."""

    code_bits, cfg = 4, SimpleNamespace(downsample=2)

    def encode_cells(self, x_BCHW):
        B = x_BCHW.shape[0]
        return torch.arange(B * 4).view(B, 4) % 8  # top bit clear, every pattern of the low bits occurs

    def decode_cells(self, cells_BL, grid):
        top_Bhw = (cells_BL >> 3).float().view(-1, 1, grid, grid)
        return top_Bhw.repeat_interleave(2, -1).repeat_interleave(2, -2) - 0.5


def test_only_the_bit_the_decoder_reads_costs_anything():
    x = torch.full((4, 1, 4, 4), -0.4)  # decoded as -0.5 (error 0.01); with bit 0 flipped as 0.5 (error 0.81)
    tok = OnlyTopBit()
    r = flip_costs(tok, x, tok.encode_cells(x))
    assert r["mse_increase"][0] == pytest.approx(0.8, rel=1e-4)
    assert r["psnr_drop"][0] == pytest.approx(10 * math.log10(81), rel=1e-4)
    assert r["mse_increase"][1:] == [0.0, 0.0, 0.0] and r["psnr_drop"][1:] == [0.0, 0.0, 0.0]
    half = flip_costs(tok, x, tok.encode_cells(x), share=0.5, seed=1)
    assert 0 < half["mse_increase"][0] < r["mse_increase"][0]


def test_exact_distribution_gives_no_loss_on_determined_bits_and_ln2_on_a_coin():
    vocab = Vocab.parse("2-2")
    # cells 0b0100 and 0b0101: bits 0, 1, 2 fixed, bit 3 a fair coin; the model knows exactly that
    cells_N = torch.tensor([[0b0100], [0b0101]] * 8).view(-1, 1)
    sub_Nn = cells_to_subcodes(cells_N, vocab)[:, 0]
    logits_NnV = torch.full((len(sub_Nn), 2, 4), -1e9)
    logits_NnV[:, 0, 1] = 0  # first sub-code is 01
    logits_NnV[:, 1, 0] = logits_NnV[:, 1, 1] = 0  # second is 00 or 01 evenly
    ce = bit_cross_entropy(logits_NnV, sub_Nn, vocab)
    assert ce[:3].abs().max() < 1e-9 and ce[3].item() == pytest.approx(math.log(2))
    wrong = logits_NnV.clone()
    wrong[:, 0] = logits_NnV[:, 0].flip(-1)  # first sub-code 10: both of its bits wrong with certainty
    assert bit_cross_entropy(wrong, sub_Nn, vocab)[:2].min() > 100


def test_cli_refuses_a_share_outside_0_1(tmp_path, capsys):
    from elmgen.cli import main

    assert main(["analyze", "bits", "--tokenizer", str(tmp_path), "--share", "2", "--out", str(tmp_path / "o")]) == 2
    assert "share must be in (0, 1]" in capsys.readouterr().err

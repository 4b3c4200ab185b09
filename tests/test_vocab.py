import pytest
import torch

from elmgen.errors import ElmgenError
from elmgen.vocab import Vocab, bits_to_cells, cells_to_bits, cells_to_subcodes, subcodes_to_cells


@pytest.mark.parametrize("K,n", [(16, 1), (16, 2), (16, 4), (12, 3), (20, 2), (24, 2), (10, 5), (32, 4)])
def test_round_trip(K, n):
    vocab = Vocab.split(K, n)
    bits = torch.randint(0, 2, (3, K, 4, 5)).float()
    cells = bits_to_cells(bits)
    sub = cells_to_subcodes(cells, vocab)
    assert sub.shape == (3, 20, n)
    assert sub.min() >= 0 and sub.max() < vocab.size
    assert torch.equal(subcodes_to_cells(sub, vocab), cells)
    assert torch.equal(cells_to_bits(cells, K, 4, 5), bits)


def test_most_significant_bit_first_and_raster_order():
    bits = torch.zeros(1, 8, 2, 2)
    bits[0, :, 0, 1] = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0])  # cell (row 0, col 1) = raster index 1
    cells = bits_to_cells(bits)
    assert cells.tolist() == [[0, 0b10110010, 0, 0]]
    sub = cells_to_subcodes(cells, Vocab.split(8, 2))
    assert sub[0, 1].tolist() == [0b1011, 0b0010]  # first chunk 1011 -> 11


def test_parse_and_errors():
    v = Vocab.parse("2-10")
    assert (v.num_subcodes, v.subcode_bits, v.bits, v.size, str(v)) == (2, 10, 20, 1024, "2-10")
    with pytest.raises(ElmgenError, match="cannot be split"):
        Vocab.split(16, 3)
    with pytest.raises(ElmgenError, match="N-C"):
        Vocab.parse("two-eight")

import pytest
import torch

from quantbench.formats import packing
from quantbench.formats.packing import pack_bits, pack_bytes, unpack_bits, unpack_bytes


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 31, 64, 100, 577])
def test_round_trip(bits, n):
    torch.manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (7, n), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (7, -(-n * bits // 32))
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_four_bit_layout_low_nibble_first():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]], dtype=torch.uint8)
    word = pack_bits(codes, 4)[0, 0].item() & 0xFFFFFFFF
    assert word == 0xF7654321


def test_three_bit_codes_straddle_words():
    codes = torch.zeros(1, 11, dtype=torch.uint8)
    codes[0, 10] = 0b111  # stream bits 30..32: two bits in word 0, one in word 1
    packed = pack_bits(codes, 3)
    assert packed[0, 0].item() & 0xFFFFFFFF == 0b11 << 30
    assert packed[0, 1].item() == 1


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_fast_path_matches_the_general_bit_stream(bits):
    """Widths that divide 8 pack within bytes; words and bytes must be the general stream's, and the bytes of
    `pack_bytes` those of its words, low byte first (built here by shifts, whatever the host's byte order)."""
    torch.manual_seed(bits)
    codes = torch.randint(0, 2**bits, (5, 77), dtype=torch.uint8)
    words = packing.packed_words(77, bits)
    general = packing._pack_stream(codes, bits, words)
    assert torch.equal(pack_bits(codes, bits), general)
    assert torch.equal(unpack_bits(general, bits, 77), codes)
    assert torch.equal(packing._unpack_stream(general.to(torch.int64) & 0xFFFFFFFF, bits, 77), codes)
    stream_bytes = ((general.to(torch.int64).unsqueeze(-1) >> torch.arange(0, 32, 8)) & 0xFF).to(torch.uint8)
    n_bytes = -(-77 * bits // 8)
    assert torch.equal(pack_bytes(codes, bits), stream_bytes.reshape(5, -1)[:, :n_bytes])
    assert torch.equal(unpack_bytes(pack_bytes(codes, bits), bits, 77), codes)


def test_rejects_codes_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        pack_bits(torch.tensor([[16]], dtype=torch.uint8), 4)

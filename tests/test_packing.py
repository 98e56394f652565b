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


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 9, 77])
def test_packing_lays_codes_as_the_bit_stream_built_bit_by_bit(bits, n):
    """Words and bytes must be the stream built here one bit at a time, and the bytes of `pack_bytes` those of
    its words, low byte first (built here by shifts, whatever the host's byte order)."""
    torch.manual_seed(bits * 100 + n)
    codes = torch.randint(0, 2**bits, (5, n), dtype=torch.uint8)
    stream = stream_pack(codes, bits, packing.packed_words(n, bits))
    assert torch.equal(pack_bits(codes, bits), stream)
    assert torch.equal(unpack_bits(stream, bits, n), codes)
    assert torch.equal(stream_unpack(stream.to(torch.int64) & 0xFFFFFFFF, bits, n), codes)
    stream_bytes = ((stream.to(torch.int64).unsqueeze(-1) >> torch.arange(0, 32, 8)) & 0xFF).to(torch.uint8)
    n_bytes = -(-n * bits // 8)
    assert torch.equal(pack_bytes(codes, bits), stream_bytes.reshape(5, -1)[:, :n_bytes])
    assert torch.equal(unpack_bytes(pack_bytes(codes, bits), bits, n), codes)


def test_rejects_codes_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        pack_bits(torch.tensor([[16]], dtype=torch.uint8), 4)


# the layout's definition, one bit at a time: the reference the packing is held to
def stream_pack(codes: torch.Tensor, bits: int, words: int) -> torch.Tensor:
    rows, n = codes.shape
    device = codes.device
    planes = (codes.to(torch.int64).unsqueeze(-1) >> torch.arange(bits, device=device)) & 1
    stream = torch.zeros(rows, words * 32, dtype=torch.int64, device=device)
    stream[:, : n * bits] = planes.reshape(rows, n * bits)
    weights = torch.ones(32, dtype=torch.int64, device=device) << torch.arange(32, device=device)
    return packing._to_int32((stream.view(rows, words, 32) * weights).sum(dim=-1))


def stream_unpack(unsigned: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    rows, words = unsigned.shape
    device = unsigned.device
    stream = ((unsigned.unsqueeze(-1) >> torch.arange(32, device=device)) & 1).reshape(rows, -1)
    planes = stream[:, : n * bits].reshape(rows, n, bits)
    weights = torch.ones(bits, dtype=torch.int64, device=device) << torch.arange(bits, device=device)
    return (planes * weights).sum(dim=-1).to(torch.uint8)

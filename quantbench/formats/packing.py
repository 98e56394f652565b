"""Bit packing of unsigned integer codes into int32 words.

Layout (the same for every width 1..8): each row is one little-endian bit stream. Code `i` of a row
occupies stream bits `[i·b, (i+1)·b)`, least significant bit first; stream bit `j` is bit `j mod 32` of
word `j // 32`. For b = 4 this puts element 0 in the low nibble of word 0 (eight codes per int32);
for b = 3 a code may straddle two words. Rows are padded with zero codes to whole words.

`pack_trits` stores ternary values {−1, 0, +1} five per byte in base 3 (3^5 = 243 ≤ 256): byte k of a row
holds elements 5k … 5k+4 as Σ (t_i + 1)·3^i, element 5k the least significant digit; rows are padded with
zeros to a multiple of five.

`pack_bytes` stores the same little-endian stream as uint8 bytes, [rows, ceil(n·b/8)]: for b = 4 two
codes per byte, element 0 in the low nibble (the compressed-tensors FP4 layout); for b = 8 one per byte.
"""

from __future__ import annotations

import math
import sys

import torch

WORD_BITS = 32
LITTLE_ENDIAN = sys.byteorder == "little"  # words and their bytes are views of one another
_ROW_CHUNK_ELEMENTS = 1 << 24  # bound the int64 temporaries of widths that do not divide 8


def packed_words(n: int, bits: int) -> int:
    return math.ceil(n * bits / WORD_BITS)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, n] integer codes in [0, 2^bits) → [rows, ceil(n·bits/32)] int32."""
    _check_codes(codes, bits)
    rows, n = codes.shape
    words = packed_words(n, bits)
    if 8 % bits == 0:
        return _words_of(_pack_within_bytes(codes, bits, 4 * words))
    out = torch.empty(rows, words, dtype=torch.int32, device=codes.device)
    for start, stop in _row_chunks(rows, n * 8):
        out[start:stop] = _words_of(_fit(_pack_octets(codes[start:stop], bits), 4 * words))
    return out


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: [rows, words] int32 → [rows, n] uint8 codes."""
    _check_bits(bits)
    rows, words = packed.shape
    if words != packed_words(n, bits):
        raise ValueError(f"{words} words cannot hold {n} codes of {bits} bits")
    data = _bytes_of(packed.to(torch.int32))
    if 8 % bits == 0:
        return _unpack_within_bytes(data, bits, n)
    out = torch.empty(rows, n, dtype=torch.uint8, device=packed.device)
    for start, stop in _row_chunks(rows, n * 8):
        out[start:stop] = _unpack_octets(_fit(data[start:stop], math.ceil(n / 8) * bits), bits, n)
    return out


def pack_bytes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, n] codes → [rows, ceil(n·bits/8)] uint8, the bit stream of `pack_bits` byte by byte."""
    n_bytes = math.ceil(codes.shape[1] * bits / 8)
    if 8 % bits == 0:
        _check_codes(codes, bits)
        return _pack_within_bytes(codes, bits, n_bytes)
    return _bytes_of(pack_bits(codes, bits))[:, :n_bytes].contiguous()


def unpack_bytes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_bytes`."""
    rows, n_bytes = packed.shape
    if n_bytes != math.ceil(n * bits / 8):
        raise ValueError(f"{n_bytes} bytes cannot hold {n} codes of {bits} bits")
    if 8 % bits == 0:
        return _unpack_within_bytes(packed, bits, n)
    padded = torch.zeros(rows, packed_words(n, bits) * 4, dtype=torch.uint8, device=packed.device)
    padded[:, :n_bytes] = packed
    return unpack_bits(_words_of(padded), bits, n)


TRITS_PER_BYTE = 5
_POWERS_OF_3 = (1, 3, 9, 27, 81)


def pack_trits(trits: torch.Tensor) -> torch.Tensor:
    """[..., n] values in {−1, 0, 1} → [..., ceil(n/5)] uint8 (base 3, five per byte)."""
    n = trits.shape[-1]
    if trits.numel() and (int(trits.min()) < -1 or int(trits.max()) > 1):
        raise ValueError("trits must be -1, 0 or +1")
    n_bytes = math.ceil(n / TRITS_PER_BYTE)
    digits = torch.ones(*trits.shape[:-1], n_bytes * TRITS_PER_BYTE, dtype=torch.uint8, device=trits.device)
    digits[..., :n] = trits + 1
    digits = digits.view(*trits.shape[:-1], n_bytes, TRITS_PER_BYTE)
    out = digits[..., -1].clone()
    for i in range(TRITS_PER_BYTE - 2, -1, -1):  # Horner's rule: every partial value stays below 243
        out.mul_(3).add_(digits[..., i])
    return out


def unpack_trits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_trits`: [..., ceil(n/5)] uint8 → [..., n] int8 in {−1, 0, 1}."""
    if packed.shape[-1] != math.ceil(n / TRITS_PER_BYTE):
        raise ValueError(f"{packed.shape[-1]} bytes do not hold {n} trits")
    trits = _trits_of_bytes(packed.device)[packed.to(torch.int32)]
    return trits.flatten(-2)[..., :n]


def _trits_of_bytes(device: torch.device) -> torch.Tensor:
    """int8 [256, 5]: the five trits each byte value holds (digit i of the byte in base 3, minus 1)."""
    powers = torch.tensor(_POWERS_OF_3, dtype=torch.int32, device=device)
    return ((torch.arange(256, dtype=torch.int32, device=device).unsqueeze(-1) // powers) % 3 - 1).to(torch.int8)


def _pack_within_bytes(codes: torch.Tensor, bits: int, n_bytes: int) -> torch.Tensor:
    """Widths that divide 8: [rows, n] codes → [rows, n_bytes] uint8, code i at bits [i·b mod 8, …) of byte
    i·b // 8 (zero codes pad the row)."""
    rows, n = codes.shape
    per_byte = 8 // bits
    lanes = torch.zeros(rows, n_bytes * per_byte, dtype=torch.uint8, device=codes.device)
    lanes[:, :n] = codes
    lanes = lanes.view(rows, n_bytes, per_byte)
    out = lanes[..., 0].clone()
    for i in range(1, per_byte):
        out |= lanes[..., i] << (i * bits)
    return out


def _unpack_within_bytes(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=data.device)
    codes = (data.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.view(data.shape[0], -1)[:, :n]


def _pack_octets(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Any width: every 8 codes fill `bits` bytes exactly. [rows, n] → [rows, ceil(n/8)·bits] uint8."""
    rows, n = codes.shape
    octets = torch.zeros(rows, math.ceil(n / 8) * 8, dtype=torch.int64, device=codes.device)
    octets[:, :n] = codes
    shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int64, device=codes.device)
    values = (octets.view(rows, -1, 8) << shifts).sum(-1, keepdim=True)  # below 2^(8·bits): no bits overlap
    byte_shifts = torch.arange(0, 8 * bits, 8, dtype=torch.int64, device=codes.device)
    return ((values >> byte_shifts) & 0xFF).to(torch.uint8).view(rows, -1)


def _unpack_octets(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    rows = data.shape[0]
    byte_shifts = torch.arange(0, 8 * bits, 8, dtype=torch.int64, device=data.device)
    values = (data.view(rows, -1, bits).to(torch.int64) << byte_shifts).sum(-1, keepdim=True)
    shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int64, device=data.device)
    return ((values >> shifts) & ((1 << bits) - 1)).to(torch.uint8).view(rows, -1)[:, :n]


def _fit(data: torch.Tensor, n_bytes: int) -> torch.Tensor:
    """A row's byte stream cut or zero-padded to `n_bytes` (what lies past its last code is zero)."""
    if data.shape[1] >= n_bytes:
        return data[:, :n_bytes].contiguous()
    return torch.nn.functional.pad(data, (0, n_bytes - data.shape[1]))


def _words_of(data: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, 4·k] little-endian bytes → int32 [rows, k] words."""
    if LITTLE_ENDIAN:
        return data.contiguous().view(torch.int32)
    shifts = torch.arange(0, WORD_BITS, 8, device=data.device, dtype=torch.int64)
    values = (data.view(data.shape[0], -1, 4).to(torch.int64) << shifts).sum(dim=-1)
    return _to_int32(values)


def _bytes_of(words: torch.Tensor) -> torch.Tensor:
    """int32 words → their little-endian bytes, whatever the host's byte order."""
    if LITTLE_ENDIAN:
        return words.contiguous().view(torch.uint8)
    shifts = torch.arange(0, WORD_BITS, 8, device=words.device, dtype=torch.int32)
    return ((words.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8).reshape(words.shape[0], -1)


def _to_int32(values: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as int32 (two's complement)."""
    return torch.where(values >= 1 << 31, values - (1 << 32), values).to(torch.int32)


def _row_chunks(rows: int, elements_per_row: int):
    step = max(1, _ROW_CHUNK_ELEMENTS // max(1, elements_per_row))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _check_codes(codes: torch.Tensor, bits: int) -> None:
    _check_bits(bits)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"codes out of range for {bits} bits")


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")

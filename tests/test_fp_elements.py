"""The MX element formats against the OCP MX v1.0 spec: every code, every representable value, every
midpoint, saturation, signed zero and NaN."""

import math

import pytest
import torch

from quantbench.formats.fp import E2M1, E2M3, E3M2, E4M3, E5M2, INT8, floor_log2, pow2

FLOATS = [E2M1, E2M3, E3M2, E4M3, E5M2]

# (max normal, min normal, max subnormal, min subnormal) as the spec's tables give them
SPEC_LIMITS = {
    "e2m1": (6.0, 1.0, 0.5, 0.5),
    "e2m3": (7.5, 1.0, 0.875, 0.125),
    "e3m2": (28.0, 0.25, 0.1875, 0.0625),
    "e4m3": (448.0, 2.0**-6, 0.875 * 2.0**-6, 2.0**-9),
    "e5m2": (57344.0, 2.0**-14, 0.75 * 2.0**-14, 2.0**-16),
}
EMAX = {"e2m1": 2, "e2m3": 2, "e3m2": 4, "e4m3": 8, "e5m2": 15}  # the spec's emax_elem


def reference_value(code: int, e_bits: int, m_bits: int) -> float:
    """The spec's definition, written independently of the implementation."""
    sign = -1.0 if code >> (e_bits + m_bits) else 1.0
    exponent = (code >> m_bits) & ((1 << e_bits) - 1)
    mantissa = code & ((1 << m_bits) - 1)
    bias = 2 ** (e_bits - 1) - 1
    if exponent == 0:
        return sign * math.ldexp(mantissa / 2**m_bits, 1 - bias)
    return sign * math.ldexp(1 + mantissa / 2**m_bits, exponent - bias)


def finite_codes(fmt) -> list[int]:
    return [c for c in range(1 << fmt.bits) if math.isfinite(float(fmt.table[c]))]


def positive_values(fmt) -> list[float]:
    return [float(fmt.table[c]) for c in range(fmt.sign_bit) if math.isfinite(float(fmt.table[c]))]


@pytest.mark.parametrize("fmt", FLOATS, ids=lambda f: f.name)
def test_every_code_decodes_to_the_spec_value(fmt):
    for code in finite_codes(fmt):
        expected = reference_value(code, fmt.exponent_bits, fmt.mantissa_bits)
        decoded = float(fmt.decode(torch.tensor([code], dtype=torch.uint8)))
        assert decoded == expected and math.copysign(1, decoded) == math.copysign(1, expected), hex(code)
    values = positive_values(fmt)
    max_normal, min_normal, max_subnormal, min_subnormal = SPEC_LIMITS[fmt.name]
    assert max(values) == max_normal == fmt.max_value
    assert min(v for v in values if v >= min_normal) == min_normal
    assert min(v for v in values if v > 0) == min_subnormal
    assert max(v for v in values if v < min_normal) == max_subnormal
    assert fmt.max_exponent == EMAX[fmt.name]
    assert len(set(values)) == len(values)  # no two codes share a value, except ±0


def test_fp4_table_is_the_spec_table():
    assert positive_values(E2M1) == [0, 0.5, 1, 1.5, 2, 3, 4, 6]


@pytest.mark.parametrize("fmt,dtype", [(E4M3, torch.float8_e4m3fn), (E5M2, torch.float8_e5m2)], ids=["e4m3", "e5m2"])
def test_fp8_tables_match_torch_float8(fmt, dtype):
    torch_values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()
    ours = fmt.table
    assert torch.equal(ours.isnan(), torch_values.isnan())
    finite = ~ours.isnan()
    assert torch.equal(ours[finite], torch_values[finite])
    assert torch.equal(torch.signbit(ours[finite]), torch.signbit(torch_values[finite]))


@pytest.mark.parametrize("fmt", FLOATS, ids=lambda f: f.name)
def test_every_representable_value_encodes_to_its_code(fmt):
    codes = torch.tensor(finite_codes(fmt), dtype=torch.uint8)
    assert torch.equal(fmt.encode(fmt.decode(codes)), codes)


@pytest.mark.parametrize("fmt", FLOATS, ids=lambda f: f.name)
def test_midpoints_round_to_even_and_neighbours_to_nearest(fmt):
    values = positive_values(fmt)
    for k in range(len(values) - 1):
        low, high = values[k], values[k + 1]
        mid = torch.tensor([(low + high) / 2])
        even = k if k % 2 == 0 else k + 1  # consecutive magnitudes have consecutive codes
        assert int(fmt.encode(mid)) == even, (low, high)
        assert int(fmt.encode(-mid)) == even | fmt.sign_bit
        below, above = torch.nextafter(mid, torch.tensor([0.0])), torch.nextafter(mid, torch.tensor([math.inf]))
        assert int(fmt.encode(below)) == k and int(fmt.encode(above)) == k + 1


@pytest.mark.parametrize("fmt", FLOATS, ids=lambda f: f.name)
def test_values_beyond_the_max_saturate(fmt):
    top = fmt.max_magnitude_code
    beyond = torch.tensor([fmt.max_value * 1.0001, fmt.max_value * 1.5, fmt.max_value * 2, 3e38, math.inf])
    assert (fmt.encode(beyond) == top).all()
    assert (fmt.encode(-beyond) == top | fmt.sign_bit).all()
    assert torch.isfinite(fmt.decode(fmt.encode(beyond))).all()


@pytest.mark.parametrize("fmt", FLOATS, ids=lambda f: f.name)
def test_negative_zero(fmt):
    tiny = positive_values(fmt)[1] / 4  # rounds to zero
    codes = fmt.encode(torch.tensor([-0.0, 0.0, -tiny, tiny]))
    assert codes.tolist() == [fmt.sign_bit, 0, fmt.sign_bit, 0]
    decoded = fmt.decode(codes)
    assert (decoded == 0).all() and torch.signbit(decoded).tolist() == [True, False, True, False]


def test_nan_inputs():
    nan = torch.tensor([math.nan])
    assert int(E4M3.encode(nan)) == 0x7F and math.isnan(float(E4M3.decode(E4M3.encode(nan))))
    assert math.isnan(float(E5M2.decode(E5M2.encode(nan))))
    assert float(E2M1.decode(E2M1.encode(nan))) == 0  # FP4/FP6 have no NaN


def nearest_even_reference(fmt, x: torch.Tensor) -> torch.Tensor:
    """Brute force: the representable value nearest to each clamped |x|, ties to the even code."""
    grid = torch.tensor(positive_values(fmt), dtype=torch.float64)
    a = x.double().abs().clamp(max=fmt.max_value)
    distance = (a.unsqueeze(-1) - grid).abs()
    best = distance.min(dim=-1, keepdim=True).values
    candidates = distance == best
    index = torch.arange(len(grid))
    # among the (at most two) nearest, prefer the even code
    score = torch.where(candidates, (index % 2) * 2 + index / len(grid), torch.tensor(math.inf))
    magnitude = score.argmin(dim=-1)
    return torch.where(torch.signbit(x), magnitude | fmt.sign_bit, magnitude).to(torch.uint8)


@pytest.mark.parametrize("fmt", FLOATS, ids=lambda f: f.name)
def test_random_values_match_a_brute_force_reference(fmt):
    torch.manual_seed(0)
    spread = 2.0 ** torch.randint(-20, 20, (20000,)).float()
    x = torch.randn(20000) * spread * fmt.max_value / 8
    assert torch.equal(fmt.encode(x), nearest_even_reference(fmt, x))


@pytest.mark.parametrize("fmt,dtype", [(E4M3, torch.float8_e4m3fn), (E5M2, torch.float8_e5m2)], ids=["e4m3", "e5m2"])
def test_fp8_encoding_matches_torch_casts_in_range(fmt, dtype):
    torch.manual_seed(1)
    x = (torch.randn(100000) * 2.0 ** torch.randint(-18, 14, (100000,)).float()).clamp(-fmt.max_value, fmt.max_value)
    assert torch.equal(fmt.encode(x), x.to(dtype).view(torch.uint8))


def test_mxint8_element_is_twos_complement_times_a_sixty_fourth():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    assert torch.equal(INT8.decode(codes), codes.view(torch.int8).float() / 64)
    assert INT8.decode(torch.tensor([0x80], dtype=torch.uint8)).item() == -2.0
    values = torch.tensor([1.0, -1.0, 1 / 128, 3 / 128, 5.0, -5.0, 127 / 64])
    # 1/128 = 0.5 steps → 0 (even); 3/128 = 1.5 steps → 2 (even); ±5 saturates to 127/64 and -2
    assert INT8.decode(INT8.encode(values)).tolist() == [1.0, -1.0, 0.0, 2 / 64, 127 / 64, -2.0, 127 / 64]
    assert INT8.max_exponent == 0


def test_bit_helpers_are_exact():
    exponents = torch.arange(-149, 128)
    powers = pow2(exponents)
    assert powers.tolist() == [math.ldexp(1.0, int(e)) for e in exponents]
    x = torch.tensor([1.0, 1.9999999, 2.0, 3.0, 0.75, 2.0**-126, 1e-40, 0.0, 3e38])
    assert floor_log2(x).tolist() == [0, 0, 1, 1, -1, -126, -127, -127, 127]


@pytest.mark.parametrize("fmt", [*FLOATS, INT8], ids=lambda f: f.name)
def test_rounding_values_directly_equals_decoding_the_codes(fmt):
    torch.manual_seed(2)
    x = torch.randn(50000) * 2.0 ** torch.randint(-20, 12, (50000,)).float()
    table = fmt.table[torch.isfinite(fmt.table)]
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e30, -1e30])
    for values in (x, table, (table[1:] + table[:-1]) / 2, specials):
        via_codes, direct = fmt.decode(fmt.encode(values)), fmt.round_values(values)
        same = (via_codes == direct) | (via_codes.isnan() & direct.isnan())
        assert same.all() and torch.equal(torch.signbit(via_codes[~via_codes.isnan()]), torch.signbit(direct[~direct.isnan()]))

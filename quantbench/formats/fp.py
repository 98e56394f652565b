"""Element formats of the OCP Microscaling (MX) v1.0 spec: FP4 (E2M1), FP6 (E2M3, E3M2), FP8 (E4M3, E5M2),
and the MXINT8 element (two's complement int8 with an implied scale of 2^-6).

Codes are sign-magnitude bit patterns `[sign | exponent | mantissa]` in a uint8. Conversion follows the
spec: round to nearest, ties to even; subnormals; finite values beyond the largest magnitude saturate to
it (never inf or NaN). Negative zero keeps its sign bit. NaN inputs become the format's NaN code where
it has one (E4M3, E5M2); FP4 and FP6 have none and the spec leaves the conversion to the implementation:
here they become +0.

Everything is integer bit manipulation or division by exact powers of two, so codes are identical on
every device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache, cached_property

import torch

from quantbench.formats.chunked import rowwise_chunked

_FP32_MANTISSA_BITS = 23
_FP32_BIAS = 127
_FP32_INF_BITS = 0x7F800000


def floor_log2(x: torch.Tensor) -> torch.Tensor:
    """floor(log2(|x|)) of float32 values, exact, read from the exponent field (int32).
    Zero and float32 subnormals give -127."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits >> _FP32_MANTISSA_BITS) & 0xFF) - _FP32_BIAS


def pow2(exponent: torch.Tensor) -> torch.Tensor:
    """2^e as float32 for integer e in [-149, 127], built from bits (exact on every device)."""
    e = exponent.to(torch.int32)
    normal = (e + _FP32_BIAS).clamp(min=1) << _FP32_MANTISSA_BITS
    subnormal = torch.ones_like(e) << (e + 149).clamp(0, _FP32_MANTISSA_BITS - 1)
    return torch.where(e >= -126, normal, subnormal).view(torch.float32)


@dataclass(frozen=True)
class FloatElement:
    """A sign-magnitude minifloat. `max_value` is its largest finite magnitude: E4M3 gives up its top
    mantissa code to NaN (max 448); E5M2 keeps IEEE-style inf/NaN exponents (max 57344)."""

    name: str
    exponent_bits: int
    mantissa_bits: int
    max_value: float
    nan_code: int | None = None  # the positive NaN code, if any

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def bias(self) -> int:
        return (1 << (self.exponent_bits - 1)) - 1

    @property
    def min_exponent(self) -> int:
        """Exponent of the smallest normal value (subnormals share it)."""
        return 1 - self.bias

    @property
    def max_exponent(self) -> int:
        """emax: exponent of the largest normal value, as the MX scale rule uses it."""
        return int(floor_log2(torch.tensor(self.max_value)))

    @property
    def sign_bit(self) -> int:
        return 1 << (self.bits - 1)

    @cached_property
    def max_magnitude_code(self) -> int:
        return int(self._encode(torch.tensor([self.max_value])))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest code of every element (ties to even, saturating), as uint8."""
        return rowwise_chunked(self._encode, x.reshape(-1)).view(x.shape)

    def _steps(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For magnitudes `a` (already clamped to max): the exponent e of each, clamped to emin, and
        n = round(a / 2^(e − m)), the number of grid steps at that exponent (ties to even). 2^(m − e) is a
        normal float32 for every element format, so the product is exact."""
        m = self.mantissa_bits
        exponent = floor_log2(a).clamp_(min=self.min_exponent)
        inverse_step = ((m + _FP32_BIAS) - exponent).bitwise_left_shift_(_FP32_MANTISSA_BITS)
        return exponent, inverse_step.view(torch.float32).mul_(a).round_()

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        # The magnitude code is (e − emin)·2^m + n for normals and subnormals alike, including an n that
        # rounded up into the next binade.
        bits = x.float().contiguous().view(torch.int32)
        magnitude_bits = bits & 0x7FFFFFFF
        exponent, steps = self._steps(magnitude_bits.view(torch.float32).clamp(max=self.max_value))
        codes = steps.to(torch.int32)
        codes += exponent.sub_(self.min_exponent).bitwise_left_shift_(self.mantissa_bits)
        codes |= (bits >> 31).bitwise_and_(1).bitwise_left_shift_(self.bits - 1)
        codes.masked_fill_(magnitude_bits > _FP32_INF_BITS, self.nan_code or 0)
        return codes.to(torch.uint8)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Value of every code, float32."""
        return rowwise_chunked(_table_on(self, codes.device).__getitem__, codes.long().reshape(-1)).view(codes.shape)

    def round_values(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode(x)) without the codes: the same steps on values, fewer passes."""
        return rowwise_chunked(self._round_values, x.reshape(-1)).view(x.shape)

    def _round_values(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        exponent, steps = self._steps(x.abs().clamp_(max=self.max_value))
        step = exponent.add_(_FP32_BIAS - self.mantissa_bits).bitwise_left_shift_(_FP32_MANTISSA_BITS)
        rounded = torch.copysign(steps.mul_(step.view(torch.float32)), x)
        return rounded.masked_fill_(torch.isnan(x), math.nan if self.nan_code is not None else 0.0)

    @cached_property
    def table(self) -> torch.Tensor:
        """The value of each of the 2^bits codes, from the definition (float64 → float32, exact)."""
        values = []
        for code in range(1 << self.bits):
            sign = -1.0 if code & self.sign_bit else 1.0
            field = (code >> self.mantissa_bits) & ((1 << self.exponent_bits) - 1)
            mantissa = code & ((1 << self.mantissa_bits) - 1)
            magnitude_code = code & (self.sign_bit - 1)
            if self.nan_code is not None and magnitude_code > self.max_magnitude_code:
                is_inf = self.name == "e5m2" and mantissa == 0
                values.append(sign * float("inf") if is_inf else float("nan"))
            elif field == 0:
                values.append(sign * mantissa * 2.0 ** (self.min_exponent - self.mantissa_bits))
            else:
                values.append(sign * (1 + mantissa / (1 << self.mantissa_bits)) * 2.0 ** (field - self.bias))
        return torch.tensor(values, dtype=torch.float64).float()


@dataclass(frozen=True)
class Int8Element:
    """The MXINT8 element: two's complement int8 k meaning k·2^-6, so values in [-2, 1 63/64]."""

    name: str = "int8"
    bits: int = 8
    max_value: float = 127 / 64
    max_exponent: int = 0
    nan_code: int | None = None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return rowwise_chunked(self._encode, x.reshape(-1)).view(x.shape)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        k = (x.float() * 64).round_().clamp_(-128, 127).nan_to_num_(0.0)
        return k.to(torch.int8).view(torch.uint8)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.to(torch.uint8).view(torch.int8).float() / 64

    def round_values(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode(x)) without the codes (two's complement has no −0: adding +0 clears it)."""
        return (x.float() * 64).round_().clamp_(-128, 127).nan_to_num_(0.0).div_(64).add_(0.0)

    @cached_property
    def table(self) -> torch.Tensor:
        return self.decode(torch.arange(256, dtype=torch.int32).to(torch.uint8))


@cache
def _table_on(element: FloatElement, device: torch.device) -> torch.Tensor:
    """The element's table, copied to each device once (a CUDA graph cannot contain the copy)."""
    return element.table.to(device)


E2M1 = FloatElement("e2m1", 2, 1, 6.0)
E2M3 = FloatElement("e2m3", 2, 3, 7.5)
E3M2 = FloatElement("e3m2", 3, 2, 28.0)
E4M3 = FloatElement("e4m3", 4, 3, 448.0, nan_code=0x7F)
E5M2 = FloatElement("e5m2", 5, 2, 57344.0, nan_code=0x7E)
INT8 = Int8Element()
ELEMENTS = {element.name: element for element in (E2M1, E2M3, E3M2, E4M3, E5M2, INT8)}

"""Uniform integer grids, 2..8 bits, symmetric or asymmetric.

Codes are unsigned in [0, 2^bits − 1] and dequantize as `(code − zero) · scale`.
Asymmetric: `scale = (max − min) / (2^b − 1)` over a range that always contains 0, integer zero point
`round(−min / scale)` (the GPTQ convention). Symmetric: the restricted signed range
`[−(2^(b−1) − 1), 2^(b−1) − 1]` (int8: ±127), `scale = absmax / (2^(b−1) − 1)`, zero fixed at `2^(b−1)`.
Scales are rounded to the nearest float16 when fitted, because that is how they are stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantbench.formats.chunked import rowwise_chunked

FP16_TINY = 2.0**-24  # smallest positive float16 (subnormal)


@dataclass(frozen=True)
class GridParams:
    """Per-row parameters of one group of columns: `scale` and `zero`, both shaped [rows, 1]."""

    scale: torch.Tensor
    zero: torch.Tensor


@dataclass(frozen=True)
class IntFormat:
    bits: int
    symmetric: bool
    scale_bits: int = 16
    block_size: None = None
    global_scale: None = None

    @property
    def has_zero_points(self) -> bool:
        return not self.symmetric

    @property
    def max_code(self) -> int:
        return (1 << self.bits) - 1

    @property
    def sym_zero(self) -> int:
        return 1 << (self.bits - 1)

    def fit(self, w: torch.Tensor) -> GridParams:
        """Fit scale and zero for each row of `w` ([rows, cols], reduced along cols)."""
        w = w.float()
        if self.symmetric:
            absmax = w.abs().amax(dim=1, keepdim=True)
            scale = _storable(_exact_div(absmax, self.sym_zero - 1))
            zero = torch.full_like(scale, float(self.sym_zero))
        else:
            lo = w.amin(dim=1, keepdim=True).clamp(max=0)
            hi = w.amax(dim=1, keepdim=True).clamp(min=0)
            scale = _storable(_exact_div(hi - lo, self.max_code))
            zero = torch.round(-lo / scale).clamp(0, self.max_code)
            # where the rounded-down scale leaves an end of the range over half a step off the grid; no branch on
            # the result, which would synchronise the device and break the solve's CUDA-graph capture
            short = (lo < -(zero + 0.5) * scale) | (hi > (self.max_code - zero + 0.5) * scale)
            scale = torch.where(short, _next_float16(scale), scale)
            zero = torch.round(-lo / scale).clamp(0, self.max_code)
        return GridParams(scale=scale, zero=zero)

    def encode(self, w: torch.Tensor, params: GridParams) -> torch.Tensor:
        """Round `w` to codes (float tensor holding integers in [0, max_code])."""
        low = 1 if self.symmetric else 0

        def encode(w, scale, zero):
            return torch.round(w.float() / scale).add_(zero).clamp_(low, self.max_code)
        return rowwise_chunked(encode, w, params.scale, params.zero)

    def decode(self, codes: torch.Tensor, params: GridParams) -> torch.Tensor:
        return rowwise_chunked(lambda c, s, z: (c.float() - z).mul_(s), codes, params.scale, params.zero)

    def round(self, w: torch.Tensor, params: GridParams) -> torch.Tensor:
        """The nearest grid point of every element: decode(encode(w))."""
        return self.decode(self.encode(w, params), params)

    def for_weight(self, weight: torch.Tensor) -> "IntFormat":
        return self

    def store_scales(self, scale: torch.Tensor) -> torch.Tensor:
        return scale.half()  # exact: fitted scales are float16 values already

    def load_scales(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.float()

    def implied_zero(self, scale: torch.Tensor) -> torch.Tensor:
        """The zero point of symmetric grids, which is not stored."""
        return torch.full_like(scale, float(self.sym_zero))


def _exact_div(x: torch.Tensor, divisor: int) -> torch.Tensor:
    """IEEE division on every device (CUDA turns division by a Python scalar into a reciprocal multiply,
    which can differ by one ulp and would make codes depend on the device)."""
    return x / torch.full_like(x, float(divisor))


def _storable(scale: torch.Tensor) -> torch.Tensor:
    """Round to the nearest float16, as scales are stored, clamped into float16's range; all-zero groups get
    scale 1. Nearest, not up: rounding every scale up made each layer's GPTQ objective 0.06–0.14% worse on
    average (`bench/gptq_reference.py objectives`). A symmetric grid still covers its range (the scale is
    at most 2⁻¹¹ below the fitted step); an asymmetric one whose range end falls over half a step off the
    grid takes the next float16 up (`fit`)."""
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale.clamp(FP16_TINY, torch.finfo(torch.float16).max).half().float()


def _next_float16(scale: torch.Tensor) -> torch.Tensor:
    """The float16 after `scale` (itself a float16 value held in float32)."""
    half = scale.detach().half()
    step_up = torch.nextafter(half, torch.full_like(half, torch.inf)).float()
    return step_up + (scale - scale.detach())  # the gradient of the scale itself (nextafter has none)

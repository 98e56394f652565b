"""Block formats: OCP MX (blocks of 32 sharing a power-of-two E8M0 scale) and NVFP4 (E2M1 elements in
blocks of 16 sharing an E4M3 scale, under a float32 per-tensor scale).

A block runs along the input (reduction) dimension of a weight, or along the hidden dimension of an
activation. Like the integer grids, these formats `fit` per-row parameters to a block of columns and
`encode`/`decode` with them, so RTN and GPTQ use them unchanged. `GridParams.scale` holds the block's
scale as a float32 value; the zero point is always 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from quantbench.formats.fp import E2M1, E2M3, E3M2, E4M3, E5M2, INT8, FloatElement, Int8Element, floor_log2, pow2
from quantbench.formats.chunked import rowwise_chunked
from quantbench.formats.integer import GridParams

class _ElementBlocks:
    """What every block format does alike: element codes times the block's scale. A zero scale (an NVFP4
    block whose E4M3 scale rounded to 0) encodes against 1 and decodes to zeros."""

    @property
    def bits(self) -> int:
        return self.element.bits

    def encode(self, w: torch.Tensor, params: GridParams) -> torch.Tensor:
        return rowwise_chunked(lambda w, s: self.element.encode(w.float() / s), w, _nonzero(params.scale))

    def decode(self, codes: torch.Tensor, params: GridParams) -> torch.Tensor:
        return rowwise_chunked(lambda c, s: self.element.decode(c) * s, codes, params.scale)

    def round(self, w: torch.Tensor, params: GridParams) -> torch.Tensor:
        """decode(encode(w)), computed on values in one pass over cache-sized chunks."""
        element = self.element
        return rowwise_chunked(lambda w, s, t: element.round_values(w.float() / s) * t,
                               w, _nonzero(params.scale), params.scale)

    def implied_zero(self, scale: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(scale)


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale > 0, scale, torch.ones_like(scale))


E8M0_BIAS = 127
E8M0_MIN_EXPONENT, E8M0_MAX_EXPONENT = -127, 127  # code 255 is NaN and never produced


@dataclass(frozen=True)
class MXFormat(_ElementBlocks):
    """An MX block format: `element` codes times a shared scale 2^(floor(log2(amax)) − emax_elem),
    the exponent clamped to E8M0's range (OCP MX v1.0, section 6.3). An all-zero block gets the
    smallest scale, as the spec's reference does."""

    name: str
    element: FloatElement | Int8Element
    block_size: int = 32
    scale_bits: int = 8
    has_zero_points: bool = False
    global_scale: None = None

    def for_weight(self, weight: torch.Tensor) -> "MXFormat":
        return self

    def fit(self, groups: torch.Tensor) -> GridParams:
        amax = groups.float().abs().amax(dim=1, keepdim=True)
        shared = (floor_log2(amax) - self.element.max_exponent).clamp(E8M0_MIN_EXPONENT, E8M0_MAX_EXPONENT)
        scale = pow2(shared)
        return GridParams(scale=scale, zero=torch.zeros_like(scale))

    def store_scales(self, scale: torch.Tensor) -> torch.Tensor:
        """E8M0: the biased exponent as uint8."""
        return (floor_log2(scale) + E8M0_BIAS).to(torch.uint8)

    def load_scales(self, stored: torch.Tensor) -> torch.Tensor:
        return pow2(stored.to(torch.int32) - E8M0_BIAS)


NVFP4_TENSOR_RANGE = E4M3.max_value * E2M1.max_value  # 448 · 6


@dataclass(frozen=True)
class NVFP4Format(_ElementBlocks):
    """NVFP4: E2M1 elements; per block of 16, an E4M3 scale s8 = E4M3(amax_block / 6 · g); per tensor,
    g = 448·6 / amax(W) in float32. An element decodes as e2m1 · (s8 / g), the convention of
    compressed-tensors (`weight_global_scale` is g). `for_weight` sets g; a block whose s8 rounds to 0
    decodes to zeros."""

    global_scale: torch.Tensor | None = field(default=None, compare=False)
    name: str = "nvfp4"
    element: FloatElement = E2M1
    block_size: int = 16
    scale_bits: int = 8
    has_zero_points: bool = False

    def for_weight(self, weight: torch.Tensor) -> "NVFP4Format":
        amax = weight.detach().float().abs().amax().reshape(1)
        g = torch.full_like(amax, NVFP4_TENSOR_RANGE) / amax
        g = torch.where((amax > 0) & torch.isfinite(g), g, torch.ones_like(g))
        return replace(self, global_scale=g)

    def _g(self) -> torch.Tensor:
        if self.global_scale is None:
            raise ValueError("NVFP4 needs its per-tensor scale: call for_weight(weight) first")
        return self.global_scale

    def fit(self, groups: torch.Tensor) -> GridParams:
        amax = groups.float().abs().amax(dim=1, keepdim=True)
        block_scale = amax / torch.full_like(amax, self.element.max_value) * self._g()
        scale = E4M3.decode(E4M3.encode(block_scale)) / self._g()
        return GridParams(scale=scale, zero=torch.zeros_like(scale))

    def store_scales(self, scale: torch.Tensor) -> torch.Tensor:
        """E4M3 codes of s8 (recovered exactly: scale·g is within float32 rounding of an E4M3 value)."""
        return E4M3.encode(scale.float() * self._g().to(scale.device))

    def load_scales(self, stored: torch.Tensor) -> torch.Tensor:
        return E4M3.decode(stored) / self._g().to(stored.device)


BLOCK_FORMATS: dict[str, MXFormat | NVFP4Format] = {
    "mxfp4": MXFormat("mxfp4", E2M1),
    "mxfp6e2m3": MXFormat("mxfp6e2m3", E2M3),
    "mxfp6e3m2": MXFormat("mxfp6e3m2", E3M2),
    "mxfp8e4m3": MXFormat("mxfp8e4m3", E4M3),
    "mxfp8e5m2": MXFormat("mxfp8e5m2", E5M2),
    "mxint8": MXFormat("mxint8", INT8),
    "nvfp4": NVFP4Format(),
}

"""`QuantizedWeight`: what every quantizer returns and export consumes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from quantbench.export.packing import pack_bits, unpack_bits
from quantbench.formats import GridParams, format_for
from quantbench.scheme import Scheme


@dataclass
class QuantizedWeight:
    """Codes of a [out, in] weight with per-(row, group) scales and zeros.

    codes: uint8 [out, in]; scales: float16 [out, n_groups]; zeros: uint8 [out, n_groups], or None for
    symmetric schemes (zero is 2^(bits−1)). Group g covers input columns [g·G, (g+1)·G); the last group
    may be shorter when G does not divide `in`.
    """

    scheme: Scheme
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def group_size(self) -> int:
        return self.scheme.group_size or self.shape[1]

    @property
    def n_groups(self) -> int:
        return math.ceil(self.shape[1] / self.group_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """`(code − zero) · scale` in float32, broadcast per group, then cast to `dtype`."""
        out_features, in_features = self.shape
        group, n_groups = self.group_size, self.n_groups
        codes = self.codes
        if n_groups * group != in_features:
            codes = torch.nn.functional.pad(codes, (0, n_groups * group - in_features))
        codes = codes.view(out_features, n_groups, group)
        scale = self.scales.float().unsqueeze(-1)
        if self.zeros is None:
            zero = torch.tensor(float(format_for(self.scheme).sym_zero), device=codes.device)
        else:
            zero = self.zeros.float().unsqueeze(-1)
        weight = format_for(self.scheme).decode(codes, GridParams(scale=scale, zero=zero))
        return weight.view(out_features, n_groups * group)[:, :in_features].to(dtype)

    @property
    def storage_bits(self) -> int:
        """Bits needed to store this layer: codes plus per-group scales (and zeros)."""
        out_features, in_features = self.shape
        return out_features * in_features * self.scheme.bits + out_features * self.n_groups * (
            self.scheme.overhead_bits_per_group
        )

    @property
    def bits_per_weight(self) -> float:
        return self.storage_bits / self.codes.numel()

    def pack(self) -> dict[str, torch.Tensor]:
        """Tensors as stored in a checkpoint: bit-packed `qweight` (and `qzeros`), float16 `scales`."""
        tensors = {"qweight": pack_bits(self.codes, self.scheme.bits), "scales": self.scales.contiguous()}
        if self.zeros is not None:
            tensors["qzeros"] = pack_bits(self.zeros, self.scheme.bits)
        return tensors

    @classmethod
    def unpack(cls, scheme: Scheme, shape: tuple[int, int], tensors: dict[str, torch.Tensor]) -> "QuantizedWeight":
        out_features, in_features = shape
        codes = unpack_bits(tensors["qweight"], scheme.bits, in_features)
        scales = tensors["scales"]
        zeros = None
        if not scheme.symmetric:
            zeros = unpack_bits(tensors["qzeros"], scheme.bits, scales.shape[1])
        if codes.shape[0] != out_features or scales.shape[0] != out_features:
            raise ValueError(f"packed tensors do not match shape {shape}")
        return cls(scheme=scheme, codes=codes, scales=scales, zeros=zeros)


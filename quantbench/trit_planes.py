"""`TritPlaneWeight`: a weight as a sum of ternary planes with per-(row, group) scales, what PTQTP returns.

W ≈ Σ_p diag(α_p)·T_p with T_p ∈ {−1, 0, +1}: a matrix–vector product needs only additions and
subtractions of activations plus one scaling per output, group and plane.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from quantbench.column_groups import ColumnGroups, TensorSpec, layout_bits
from quantbench.formats.packing import TRITS_PER_BYTE, pack_trits, unpack_trits
from quantbench.scheme import Scheme


@dataclass
class TritPlaneWeight(ColumnGroups):
    """planes: int8 [P, out, in] in {−1, 0, 1}; scales: float16 [P, out, n_groups]. Group g covers input
    columns [g·G, (g+1)·G) (the last may be shorter); without a group size, one scale per row and plane."""

    scheme: Scheme
    planes: torch.Tensor
    scales: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.planes.shape[1:])

    def column_scales(self) -> torch.Tensor:
        """float32 [P, out, in]: each element's scale."""
        return self.scales.float().repeat_interleave(self.group_size, dim=2)[:, :, : self.shape[1]]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.column_scales() * self.planes.float()).sum(dim=0).to(dtype)

    def multiplication_free_linear(self, x: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        """Reference forward without weight multiplications: per plane, output and group, add the inputs
        whose trit is +1 and subtract those whose trit is −1, then scale the sum once. Slow (it materialises
        the selections); a kernel's job is to do the same fast."""
        out_features, in_features = self.shape
        tokens = x.reshape(-1, in_features).float()
        zero = torch.zeros((), dtype=tokens.dtype, device=tokens.device)
        group, n_groups = self.group_size, self.n_groups
        pad = n_groups * group - in_features
        tokens = torch.nn.functional.pad(tokens, (0, pad)).view(-1, 1, n_groups, group)
        y = torch.zeros(tokens.shape[0], out_features, device=tokens.device)
        for p in range(self.planes.shape[0]):
            trits = torch.nn.functional.pad(self.planes[p], (0, pad)).view(out_features, n_groups, group)
            for start in range(0, out_features, chunk):
                t = trits[start:start + chunk]
                added = torch.where(t == 1, tokens, zero).sum(dim=-1)
                subtracted = torch.where(t == -1, tokens, zero).sum(dim=-1)
                y[:, start:start + chunk] += ((added - subtracted) * self.scales[p, start:start + chunk].float()).sum(dim=-1)
        return y.view(*x.shape[:-1], out_features)

    @staticmethod
    def layout(scheme: Scheme, shape: tuple[int, int]) -> dict[str, TensorSpec]:
        """The tensors `pack` writes: five trits per byte per plane and row, float16 scales per group."""
        out_features, in_features = shape
        n_groups = math.ceil(in_features / (scheme.group_size or in_features))
        return {"qweight": TensorSpec((scheme.planes, out_features, math.ceil(in_features / TRITS_PER_BYTE)),
                                      torch.uint8),
                "scales": TensorSpec((scheme.planes, out_features, n_groups), torch.float16)}

    @property
    def storage_bits(self) -> int:
        return layout_bits(self.layout(self.scheme, self.shape))

    @property
    def bits_per_weight(self) -> float:
        return self.storage_bits / self.numel

    def pack(self) -> dict[str, torch.Tensor]:
        """`qweight`: uint8 [P, out, ceil(in/5)] base-3 trits (formats/packing.py); `scales`: float16 [P, out, groups]."""
        return {"qweight": pack_trits(self.planes), "scales": self.scales.contiguous()}

    @classmethod
    def unpack(cls, scheme: Scheme, shape: tuple[int, int], tensors: dict[str, torch.Tensor]) -> "TritPlaneWeight":
        planes = unpack_trits(tensors["qweight"], shape[1])
        if tuple(planes.shape[1:]) != tuple(shape) or planes.shape[0] != scheme.planes:
            raise ValueError(f"packed trit planes do not match shape {shape} with {scheme.planes} planes")
        return cls(scheme, planes, tensors["scales"])

    def split_rows(self, sizes: list[int]) -> list["TritPlaneWeight"]:
        return [TritPlaneWeight(self.scheme, t.contiguous(), s.contiguous())
                for t, s in zip(self.planes.split(sizes, dim=1), self.scales.split(sizes, dim=1))]

    def to(self, device: torch.device | str) -> "TritPlaneWeight":
        return TritPlaneWeight(self.scheme, self.planes.to(device), self.scales.to(device))

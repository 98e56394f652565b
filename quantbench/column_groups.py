"""What every stored-weight class shares: how a quantized [out, in] weight's input columns fall into groups,
and the shapes of the tensors it stores."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TensorSpec:
    """The shape and dtype of one stored tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def layout_bits(specs: dict[str, TensorSpec]) -> int:
    return 8 * sum(spec.nbytes for spec in specs.values())


class ColumnGroups:
    """Mixin for classes with `scheme` and `shape` (out, in): group g covers input columns
    [g·G, (g+1)·G), the last group possibly shorter; without a group size, one group per row."""

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def group_size(self) -> int:
        return self.scheme.group_size or self.shape[1]

    @property
    def n_groups(self) -> int:
        return math.ceil(self.shape[1] / self.group_size)

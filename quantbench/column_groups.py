"""How a quantized [out, in] weight's input columns fall into groups, for every stored-weight class."""

from __future__ import annotations

import math


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

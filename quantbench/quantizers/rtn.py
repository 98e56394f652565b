"""Round-to-nearest: fit each group's grid to its own values and round every weight independently."""

from __future__ import annotations

import torch

from quantbench.calibration.stats import LayerStats
from quantbench.formats import GridParams, format_for
from quantbench.quantized_weight import QuantizedWeight
from quantbench.scheme import Scheme


class RTNSolver:
    def needs_stats(self, scheme: Scheme) -> bool:
        return False

    def needs_hessian(self, scheme: Scheme) -> bool:
        return False

    def quantize(self, weight: torch.Tensor, scheme: Scheme, stats: LayerStats | None = None) -> QuantizedWeight:
        return quantize_rtn(weight, scheme)


def quantize_rtn(weight: torch.Tensor, scheme: Scheme) -> QuantizedWeight:
    """Vectorised over all (row, group) pairs at once.

    A short last group is padded with zeros, which changes no fitted range: every grid contains 0.
    """
    fmt = format_for(scheme).for_weight(weight)
    out_features, in_features = weight.shape
    group = scheme.group_size or in_features
    n_groups = -(-in_features // group)
    padded = torch.zeros(out_features, n_groups * group, dtype=torch.float32, device=weight.device)
    padded[:, :in_features] = weight.float()
    groups = padded.view(out_features * n_groups, group)
    params = fmt.fit(groups)
    codes = fmt.encode(groups, params).view(out_features, n_groups * group)[:, :in_features]
    per_group = GridParams(scale=params.scale.view(out_features, n_groups), zero=params.zero.view(out_features, n_groups))
    return QuantizedWeight.from_params(scheme, fmt, codes, per_group)

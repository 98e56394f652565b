"""Solvers that fit a weight to a format. One file each, plus an entry in `SOLVERS`."""

from __future__ import annotations

from typing import Protocol

import torch

from quantbench.calibration.stats import LayerStats
from quantbench.errors import QuantbenchError
from quantbench.model_io import all_finite, nonfinite_counts
from quantbench.quantized_weight import QuantizedWeight
from quantbench.quantizers.autoround import AutoRoundSolver
from quantbench.quantizers.gptq import GPTQSolver
from quantbench.quantizers.ptqtp import PTQTPSolver
from quantbench.quantizers.rtn import RTNSolver
from quantbench.scheme import Scheme
from quantbench.trit_planes import TritPlaneWeight


class Solver(Protocol):
    def needs_stats(self, scheme: Scheme) -> bool: ...

    def needs_hessian(self, scheme: Scheme) -> bool: ...

    def quantize(self, weight: torch.Tensor, scheme: Scheme,
                 stats: LayerStats | None) -> QuantizedWeight | TritPlaneWeight: ...


SOLVERS: dict[str, Solver] = {"rtn": RTNSolver(), "gptq": GPTQSolver(), "ptqtp": PTQTPSolver(),
                              "autoround": AutoRoundSolver()}


def solver_for(scheme: Scheme) -> Solver:
    return SOLVERS[scheme.solver]


def needs_stats(scheme: Scheme) -> bool:
    """Whether quantizing with `scheme` reads calibration statistics of the layer's input at all."""
    return solver_for(scheme).needs_stats(scheme)


def needs_hessian(scheme: Scheme) -> bool:
    """Whether those statistics must include the full Hessian Σ xᵀx (not only per-channel ones). Under a
    Hadamard transform every statistic is derived from the rotated Σ xᵀx, so any stats reader needs it."""
    solver = solver_for(scheme)
    return solver.needs_hessian(scheme) or (scheme.transform != "none" and solver.needs_stats(scheme))


def quantize_weight(weight: torch.Tensor, scheme: Scheme, stats: LayerStats | None,
                    name: str = "weight") -> QuantizedWeight | TritPlaneWeight:
    """Fit `weight` to `scheme` with its solver. Non-finite weights are refused: every solver would turn
    them into finite codes silently (a NaN zeroes its row or block, an inf takes over its group's scale)."""
    if not all_finite(weight):
        raise QuantbenchError(f"{name} has {nonfinite_counts(weight)}; no grid can store them. Fix the "
                              "checkpoint, or set model.nonfinite_weights: zero in the recipe")
    return solver_for(scheme).quantize(weight, scheme, stats)

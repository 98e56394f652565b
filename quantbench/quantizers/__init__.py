"""Solvers that fit a weight to a format. One file each, plus an entry in `SOLVERS`."""

from __future__ import annotations

from typing import Protocol

import torch

from quantbench.calibration.stats import LayerStats
from quantbench.quantized_weight import QuantizedWeight
from quantbench.quantizers.gptq import GPTQSolver
from quantbench.quantizers.ptqtp import PTQTPSolver
from quantbench.quantizers.rtn import RTNSolver
from quantbench.scheme import Scheme
from quantbench.trit_planes import TritPlaneWeight


class Solver(Protocol):
    def needs_hessian(self, scheme: Scheme) -> bool: ...

    def quantize(self, weight: torch.Tensor, scheme: Scheme,
                 stats: LayerStats | None) -> QuantizedWeight | TritPlaneWeight: ...


SOLVERS: dict[str, Solver] = {"rtn": RTNSolver(), "gptq": GPTQSolver(), "ptqtp": PTQTPSolver()}


def solver_for(scheme: Scheme) -> Solver:
    return SOLVERS[scheme.solver]


def needs_hessian(scheme: Scheme) -> bool:
    """Whether quantizing with `scheme` reads the layer's Hessian from calibration."""
    return solver_for(scheme).needs_hessian(scheme)

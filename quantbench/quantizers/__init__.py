"""Solvers that fit a weight to a format. One file each, plus an entry in `SOLVERS`."""

from __future__ import annotations

from typing import Protocol

import torch

from quantbench.calibration.stats import LayerStats
from quantbench.quantized_weight import QuantizedWeight
from quantbench.quantizers.gptq import GPTQSolver
from quantbench.quantizers.rtn import RTNSolver
from quantbench.scheme import Scheme


class Solver(Protocol):
    needs_hessian: bool

    def quantize(self, weight: torch.Tensor, scheme: Scheme, stats: LayerStats | None) -> QuantizedWeight: ...


SOLVERS: dict[str, Solver] = {"rtn": RTNSolver(), "gptq": GPTQSolver()}


def solver_for(scheme: Scheme) -> Solver:
    return SOLVERS[scheme.solver]

"""The exact allocation: a multiple-choice knapsack as an integer linear program, solved by PuLP's CBC.

Binary x[i, o] picks option o for item i; Σ_o x[i, o] = 1; minimise Σ cost·x subject to Σ bits·x ≤ budget
(and Σ latency·x ≤ latency budget). Coefficients are rescaled (costs by their median, bits to average
bits per weight) so that CBC's tolerances act on numbers of order one: scaled by their largest value,
costs spanning six orders of magnitude left CBC 0.02% short of the optimum while it reported optimality.
"""

from __future__ import annotations

import time
from collections import Counter
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from quantbench.allocation.problem import Problem
from quantbench.errors import QuantbenchError
from quantbench.yamlio import read_allocation_layers

ALLOCATION_VERSION = 1


@dataclass
class Allocation:
    """Layer → scheme name, with what the solver achieved."""

    schemes: dict[str, str]
    objective: float
    bits: int
    numel: int
    latency: float
    status: str
    solver: str
    metric: str
    budget: dict
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        return self.bits / self.numel

    def summary(self) -> dict:
        return {"solver": self.solver, "status": self.status, "metric": self.metric, "budget": self.budget,
                "objective": self.objective, "bits_per_weight": round(self.bits_per_weight, 5),
                "bytes": self.bits // 8, "latency_us": round(self.latency, 3) if self.latency else None,
                "solve_seconds": round(self.seconds, 4), **self.extra}

    def scheme_counts(self) -> dict[str, int]:
        return dict(Counter(self.schemes.values()).most_common())

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"version": ALLOCATION_VERSION, **self.summary(), "layers": self.schemes}
        path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
        return path

    @staticmethod
    def load_schemes(path: str | Path) -> dict[str, str]:
        return read_allocation_layers(path)


def allocation_from_choice(problem: Problem, choice: list[int], solver: str, status: str,
                           seconds: float) -> Allocation:
    cost, bits, latency = problem.evaluate(choice)
    schemes = {layer: item.options[c].scheme for item, c in zip(problem.items, choice) for layer in item.layers}
    return Allocation(schemes, cost, bits, problem.numel, latency, status, solver, problem.metric,
                      problem.budget, seconds)


def check_feasible(problem: Problem) -> None:
    """A clear error when no choice fits: the smallest budget that would."""
    smallest = problem.smallest_bits()
    if smallest > problem.max_bits + 1e-6:
        raise QuantbenchError(
            f"budget infeasible: the smallest candidates need {smallest / problem.numel:.4f} bits per weight "
            f"({smallest / 8:,.0f} bytes) but the budget allows {problem.max_bits / problem.numel:.4f} "
            f"({problem.max_bits / 8:,.0f} bytes); raise the budget to at least that, or add smaller candidates")
    if problem.max_latency is not None:
        fastest = sum(min(o.latency for o in item.options) for item in problem.items)
        if fastest > problem.max_latency + 1e-9:
            raise QuantbenchError(f"latency budget infeasible: the fastest candidates take {fastest:.4g} µs, "
                                  f"the budget is {problem.max_latency:.4g} µs; raise it to at least {fastest:.4g}")


def solve_ilp(problem: Problem, time_limit: float = 60.0, gap: float = 1e-7) -> Allocation:
    """The optimal allocation (within `gap`, relative), or a QuantbenchError naming the smallest feasible budget."""
    check_feasible(problem)
    started = time.perf_counter()
    status, choice = _solve(problem, [[o.cost for o in item.options] for item in problem.items],
                            problem.max_bits, problem.max_latency, time_limit, gap)
    if status == "Infeasible":  # bits and latency each reachable, not both at once
        _, fewest = _solve(problem, [[o.bits for o in item.options] for item in problem.items], None,
                           problem.max_latency, time_limit, gap)
        needed = problem.evaluate(fewest)[1]
        raise QuantbenchError(f"budget infeasible under the latency budget: within {problem.max_latency:.4g} µs "
                              f"the smallest allocation takes {needed / problem.numel:.4f} bits per weight "
                              f"({needed / 8:,.0f} bytes); raise either budget")
    if choice is None:
        raise QuantbenchError(f"the ILP solver stopped without a solution ({status}) within {time_limit:g} s; "
                              "raise allocation.time_limit_s")
    return allocation_from_choice(problem, choice, "ilp", status, time.perf_counter() - started)


def _solve(problem: Problem, costs: list[list[float]], max_bits: float | None, max_latency: float | None,
           time_limit: float, gap: float) -> tuple[str, list[int] | None]:
    """CBC on the options that are not dominated (another option of the item no larger, no slower and
    no costlier, and better in one of them; dropping those cannot change the optimum)."""
    import pulp  # here, so that a run without an allocation never needs the solver

    kept = [_undominated_options(item, row, problem.family_per_block) for item, row in zip(problem.items, costs)]
    magnitudes = sorted(abs(c) for row in costs for c in row if c)
    scale = magnitudes[len(magnitudes) // 2] if magnitudes else 1.0
    numel = problem.numel
    model = pulp.LpProblem("allocation", pulp.LpMinimize)
    x = [{o: model.add_variable(f"x_{i}_{o}", 0, 1, cat=pulp.LpBinary) for o in keep} for i, keep in enumerate(kept)]
    model += pulp.lpSum(costs[i][o] / scale * v for i, row in enumerate(x) for o, v in row.items())
    for row in x:
        model += pulp.lpSum(row.values()) == 1
    if max_bits is not None:
        model += pulp.lpSum(problem.items[i].options[o].bits / numel * v
                            for i, row in enumerate(x) for o, v in row.items()) <= max_bits / numel
    if max_latency is not None:
        model += pulp.lpSum(problem.items[i].options[o].latency / max_latency * v
                            for i, row in enumerate(x) for o, v in row.items()) <= 1.0
    if problem.family_per_block:  # y[b, f]: block b serves family f; an option may be taken only in its family
        blocks = sorted({item.block for item in problem.items})
        families = sorted({o.family for item in problem.items for o in item.options})
        y = {(b, f): model.add_variable(f"y_{bi}_{fi}", 0, 1, cat=pulp.LpBinary)
             for bi, b in enumerate(blocks) for fi, f in enumerate(families)}
        for b in blocks:
            model += pulp.lpSum(y[(b, f)] for f in families) == 1
        for i, row in enumerate(x):
            item = problem.items[i]
            for o, v in row.items():
                model += v <= y[(item.block, item.options[o].family)]
    with warnings.catch_warnings():  # PuLP 3.3 announces that 4.0 moves CBC to an extra; it is bundled here
        warnings.simplefilter("ignore", DeprecationWarning)
        model.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, gapRel=gap))
    status = pulp.LpStatus[model.status]
    if status != "Optimal" and model.sol_status not in (pulp.LpSolutionIntegerFeasible, pulp.LpSolutionOptimal):
        return status, None
    choice = [max(row, key=lambda o: row[o].varValue or 0.0) for row in x]
    if status == "Optimal" and model.sol_status != pulp.LpSolutionOptimal:
        status = "Feasible (time limit)"
    return status, choice


def _undominated_options(item, costs: list[float], per_family: bool) -> list[int]:
    """An item's options that no other is as small, as fast and as cheap as (and better in one): dropping
    the others cannot change the optimum. Under a family per block, an option only competes within its
    family, since the block may be held to it."""
    groups: dict[str, list[int]] = {}
    for o, option in enumerate(item.options):
        groups.setdefault(option.family if per_family else "", []).append(o)
    kept = []
    for members in groups.values():
        keys = [(item.options[o].bits, item.options[o].latency, costs[o]) for o in members]
        kept += [members[k] for k in undominated(keys)]
    return sorted(kept)


def undominated(keys: list[tuple]) -> list[int]:
    """Indices of the keys (tuples of quantities to minimise) that no other key matches or beats in every
    quantity while beating in one; of equal keys, the first."""
    return [i for i, key in enumerate(keys)
            if not any(other != key and all(a <= b for a, b in zip(other, key)) for other in keys)
            and keys.index(key) == i]

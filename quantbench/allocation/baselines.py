"""Allocators to compare the ILP against, on the same problem: greedy (best cost reduction per extra bit,
as mixed-precision tools commonly do), a knapsack dynamic program over discretised bits, a random
allocation that spends the same budget, and exhaustive search for small instances (tests)."""

from __future__ import annotations

import itertools
import random
import time

import numpy as np

from quantbench.allocation.ilp import Allocation, allocation_from_choice, check_feasible, solve_ilp
from quantbench.allocation.problem import Item, Option, Problem
from quantbench.errors import QuantbenchError


def solve_greedy(problem: Problem) -> Allocation:
    """Start every item at its smallest option; repeatedly take the upgrade (any item, any larger option)
    with the largest cost reduction per extra bit that still fits every budget (bits, and latency when
    given). A greedy cannot choose a family per block jointly: under that constraint it keeps one family for
    the whole model, tries each, and returns the best."""
    check_feasible(problem)
    started = time.perf_counter()
    if not problem.family_per_block:
        choice = _greedy(problem, [list(range(len(item.options))) for item in problem.items])
        if choice is None:
            raise QuantbenchError("greedy found no allocation within the budgets (its smallest start is too slow)")
        return allocation_from_choice(problem, choice, "greedy", "heuristic", time.perf_counter() - started)
    best = None
    for family in sorted({o.family for item in problem.items for o in item.options}):
        allowed = [[o for o, opt in enumerate(item.options) if opt.family == family] for item in problem.items]
        if not all(allowed):
            continue
        choice = _greedy(problem, allowed)
        if choice is not None and (best is None or problem.evaluate(choice)[0] < problem.evaluate(best)[0]):
            best = choice
    if best is None:
        raise QuantbenchError("greedy found no single family that fits the budgets")
    return allocation_from_choice(problem, best, "greedy", "heuristic, one family for all blocks",
                                  time.perf_counter() - started)


def _greedy(problem: Problem, allowed: list[list[int]]) -> list[int] | None:
    choice = [min(options, key=lambda o, item=item: (item.options[o].bits, item.options[o].latency,
                                                        item.options[o].cost))
              for item, options in zip(problem.items, allowed)]
    _, spent, latency = problem.evaluate(choice)
    max_latency = problem.max_latency if problem.max_latency is not None else float("inf")
    if spent > problem.max_bits * (1 + 1e-6) or latency > max_latency + 1e-9:
        return None
    while True:
        best, best_gain = None, 0.0
        for i, item in enumerate(problem.items):
            now = item.options[choice[i]]
            for o in allowed[i]:
                option = item.options[o]
                extra, saved = option.bits - now.bits, now.cost - option.cost
                slower = option.latency - now.latency
                if (extra > 0 and saved > 0 and spent + extra <= problem.max_bits
                        and latency + slower <= max_latency + 1e-9 and saved / extra > best_gain):
                    best, best_gain = (i, o, extra, slower), saved / extra
        if best is None:
            return choice
        i, o, extra, slower = best
        choice[i], spent, latency = o, spent + extra, latency + slower


def solve_knapsack_dp(problem: Problem, resolution: int | None = None) -> Allocation:
    """Exact dynamic program on bits rounded up to `resolution` steps of the budget (default 50 per item, so
    rounding wastes at most 2% of the budget; the answer always fits), as AutoScheme allocates. It knows the
    bit budget alone: a latency budget or a family per block is refused."""
    check_feasible(problem)
    if problem.max_latency is not None or problem.family_per_block:
        raise QuantbenchError("the knapsack DP handles a bit budget only; use the ILP (or greedy) for latency "
                              "budgets and a family per block")
    started = time.perf_counter()
    resolution = resolution or max(4000, 50 * len(problem.items))
    unit = problem.max_bits / resolution
    capacity = resolution
    best = np.full(capacity + 1, np.inf)
    best[0] = 0.0
    picks = np.zeros((len(problem.items), capacity + 1), dtype=np.int16)
    for i, item in enumerate(problem.items):
        new = np.full(capacity + 1, np.inf)
        for o, option in enumerate(item.options):
            weight = int(np.ceil(option.bits / unit - 1e-9))
            if weight > capacity:
                continue
            candidate = np.full(capacity + 1, np.inf)
            candidate[weight:] = best[:capacity + 1 - weight] + option.cost
            better = candidate < new
            new[better], picks[i, better] = candidate[better], o
        best = new
    if not np.isfinite(best).any():
        raise QuantbenchError(f"the knapsack DP found nothing within the budget at resolution {resolution}; "
                              "raise the resolution")
    used = int(np.argmin(best))
    choice = [0] * len(problem.items)
    for i in reversed(range(len(problem.items))):
        choice[i] = int(picks[i, used])
        used -= int(np.ceil(problem.items[i].options[choice[i]].bits / unit - 1e-9))
    return allocation_from_choice(problem, choice, "knapsack_dp", f"exact at {resolution} steps",
                                  time.perf_counter() - started)


def solve_random(problem: Problem, seed: int = 0, time_limit: float = 60.0) -> Allocation:
    """A random allocation that spends the budget as fully as the real one: the ILP on random costs that
    decrease with size (so the budget is used), with the true costs reported."""
    rng = random.Random(seed)
    shuffled = Problem(
        [Item(item.name, item.layers, item.numel,
              [Option(o.scheme, rng.random() / (1 + o.bits / item.numel), o.bits, o.latency, o.family)
               for o in item.options], item.block) for item in problem.items],
        problem.max_bits, problem.max_latency, problem.metric, problem.budget, problem.family_per_block)
    picked = solve_ilp(shuffled, time_limit)
    choice = [next(o for o, opt in enumerate(item.options) if opt.scheme == picked.schemes[item.layers[0]])
              for item in problem.items]
    return allocation_from_choice(problem, choice, f"random (seed {seed})", "heuristic", picked.seconds)


def solve_brute_force(problem: Problem) -> Allocation:
    """Every combination; for instances of a few items only."""
    started = time.perf_counter()
    best, best_cost = None, np.inf
    for choice in itertools.product(*(range(len(item.options)) for item in problem.items)):
        cost = problem.evaluate(list(choice))[0]
        if cost < best_cost and problem.feasible(list(choice)):
            best, best_cost = list(choice), cost
    if best is None:
        raise QuantbenchError("no combination fits the budgets")
    return allocation_from_choice(problem, best, "brute_force", "optimal", time.perf_counter() - started)


SOLVERS = {"ilp": solve_ilp, "greedy": solve_greedy, "knapsack_dp": solve_knapsack_dp, "random": solve_random}

"""A recipe's allocation section carried out: which layers take which candidates, the sensitivity stage,
the problem with its constraints, and its solution for one budget or a sweep of budgets."""

from __future__ import annotations

import re

import torch
from torch import nn

from quantbench.allocation.baselines import SOLVERS
from quantbench.allocation.gradients import GradientStats, gradient_stats
from quantbench.allocation.ilp import Allocation
from quantbench.allocation.problem import Problem, Rule, build_problem
from quantbench.allocation.sensitivity import CandidateCache, HessianOptions, sensitivity_table
from quantbench.allocation.table import SensitivityTable
from quantbench.distributed import current as current_ranks
from quantbench.distributed import local_rows
from quantbench.errors import QuantbenchError
from quantbench.model_io import model_linears
from quantbench.recipe import AllocationSection, Recipe
from quantbench.scheme import Scheme


def candidates_for(recipe: Recipe):
    """Layer → the candidates the allocation may give it: none for ignored layers; those every matching
    rule with a scheme list allows."""
    section = recipe.allocation

    def lookup(layer: str) -> list[Scheme]:
        if any(re.search(p, layer) for p in recipe.quantize.ignore):
            return []
        allowed = list(section.candidates)
        for rule in section.rules:
            if rule.schemes is not None and re.search(rule.pattern, layer):
                names = {s.name for s in rule.schemes}
                allowed = [s for s in allowed if s.name in names]
        return allowed

    return lookup


def hessian_options(section: AllocationSection, seed: int) -> HessianOptions:
    return HessianOptions(**section.hessian.model_dump(), seed=seed)


def gradients_for(model: nn.Module, input_ids: torch.Tensor, recipe: Recipe, device: torch.device,
                  progress: bool = True) -> GradientStats | None:
    """The gradient statistics the section's measures need (one backward pass per batch), or None."""
    section = recipe.allocation
    if "gradients" not in section.measures:
        return None
    layers = [name for name, linear in model_linears(model).items() if candidates_for(recipe)(name)]
    ids, ranks = input_ids[:section.gradient_samples], current_ranks()
    split = ranks.active and ids.shape[0] >= ranks.world  # each rank backpropagates its share
    return gradient_stats(model, local_rows(ids) if split else ids, layers, device,
                          batch_size=min(recipe.calibration.batch_size, 4), progress=progress, across_ranks=split)


def measure_sensitivity(model: nn.Module, input_ids: torch.Tensor, recipe: Recipe, device: torch.device,
                        progress: bool = True, cache: CandidateCache | None = None,
                        gradients: GradientStats | None = None) -> SensitivityTable:
    """Round 0 of the search: every candidate on full-precision inputs, with the measures the section asks."""
    section = recipe.allocation
    table = sensitivity_table(model, input_ids, candidates_for(recipe), device,
                              measure=section.measures, hessian=hessian_options(section, recipe.calibration.seed),
                              kl_samples=section.kl_samples, batch_size=recipe.calibration.batch_size,
                              progress=progress, cache=cache, gradients=gradients,
                              block_tokens=section.block_tokens if "block_output" in section.measures else 0,
                              experts=recipe.quantize.experts.policy(), **recipe.block_methods())
    if section.keep_full_precision:
        table = table.with_keep({name: next(model.parameters()).element_size() * 8 for name in table.layers})
    table.meta = {**table.meta, "model": recipe.model.name, "recipe_hash": recipe.hash(),
                  "calibration": recipe.calibration.model_dump(), "measured": sorted(section.measures)}
    return table


def problem_for(table: SensitivityTable, section: AllocationSection, budget: float | None = None,
                budget_bytes: int | None = None, metric: str | None = None) -> Problem:
    """The problem for a budget (default: the section's); bits per weight win over bytes when both are given."""
    if budget is None and budget_bytes is None:
        budget, budget_bytes = section.budget, section.budget_bytes
    if budget is not None:
        budget_bytes = None
    if budget is None and budget_bytes is None:
        raise QuantbenchError("no budget: set allocation.budget (bits per weight) or allocation.budget_bytes, "
                              "or pass --budget / --budget-bytes")
    rules = [Rule(r.pattern, tuple(s.name for s in r.schemes) if r.schemes is not None else None, r.min_bits,
                  r.max_bits) for r in section.rules]
    latency = section.latency
    return build_problem(table, metric or section.metric, budget, budget_bytes, [tuple(t) for t in section.ties],
                         rules, latency.resolved_table() if latency else None, latency.budget_us if latency else None,
                         section.family_per_block)


def solve(problem: Problem, section: AllocationSection, solver: str | None = None) -> Allocation:
    name = solver or section.solver
    if name == "ilp":
        return SOLVERS[name](problem, time_limit=section.time_limit_s)
    return SOLVERS[name](problem)


def allocate(table: SensitivityTable, section: AllocationSection, budget: float | None = None,
             budget_bytes: int | None = None, solver: str | None = None, metric: str | None = None) -> Allocation:
    return solve(problem_for(table, section, budget, budget_bytes, metric), section, solver)


def sweep(table: SensitivityTable, section: AllocationSection, budgets: list[float],
          metric: str | None = None) -> list[Allocation | QuantbenchError]:
    """The allocation at every budget; a budget below the smallest feasible one gives its error instead."""
    points: list[Allocation | QuantbenchError] = []
    for budget in budgets:
        try:
            points.append(allocate(table, section, budget=budget, metric=metric))
        except QuantbenchError as exc:
            points.append(exc)
    return points

"""The allocation search in context: costs measured on the inputs each block really sees.

Round 0 measures every candidate on full-precision inputs and allocates. Each later round runs the block
driver with two stages per block: the sensitivity stage re-measures the candidates that can still matter (the
options no other option of their item beats in both size and cost; with `remeasure="neighbours"` only the
chosen one and its frontier neighbours by size) on the block's inputs *as the upstream
blocks are quantized under the current allocation*, then the quantize stage quantizes the block with that
allocation. The re-measured costs replace the old ones and the allocation is solved again. When it no longer
changes, the model is already quantized with it, in context; the loop stops after `max_rounds` or when an
allocation repeats, and then quantizes once more with the last one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from quantbench.allocation.gradients import GradientStats
from quantbench.allocation.ilp import Allocation, undominated
from quantbench.allocation.problem import tie_groups
from quantbench.allocation.sensitivity import CandidateCache, CandidatesFor, SensitivityStage
from quantbench.allocation.table import SensitivityTable
from quantbench.experts import StarvedExperts
from quantbench.pipeline import QuantizeStage, StageTimer, drive_blocks, restore_linears, snapshot_linears
from quantbench.quantizers.autoround import AutoRoundOptions
from quantbench.recipe import KEEP
from quantbench.scaling import ScalingOptions
from quantbench.scheme import Scheme

log = logging.getLogger(__name__)


def scheme_lookup(schemes: dict[str, str]) -> Callable[[str], Scheme | None]:
    """Layer → the Scheme an allocation gives it; None for layers it keeps (or does not name)."""
    parsed = {layer: Scheme.parse(name) for layer, name in schemes.items() if name != KEEP}
    return parsed.get


@dataclass
class SearchRound:
    round: int
    allocation: Allocation
    changed_layers: int  # layers whose scheme differs from the round before
    remeasured: int  # (layer, candidate) pairs measured in this round
    seconds: float

    def record(self) -> dict:
        return {"round": self.round, "changed_layers": self.changed_layers, "remeasured": self.remeasured,
                "objective": self.allocation.objective, "bits_per_weight": round(self.allocation.bits_per_weight, 5),
                "seconds": round(self.seconds, 2)}


@dataclass
class InContextSearch:
    table: SensitivityTable
    allocation: Allocation
    quantized: dict
    rounds: list[SearchRound] = field(default_factory=list)
    converged: bool = False
    starved_experts: dict = field(default_factory=dict)  # of the quantization that produced `quantized`
    scaled: dict = field(default_factory=dict)  # what its AWQ/SmoothQuant sites chose


def frontier_candidates(table: SensitivityTable, metric: str, ties) -> dict[str, list[str]]:
    """Layer → the candidates worth re-measuring: per tie group, those no other candidate beats in both summed
    storage and summed cost (the others cannot be chosen unless costs move a lot)."""
    keep: dict[str, list[str]] = {}
    for layers in tie_groups(list(table.layers), ties):
        schemes = [s for s in table.candidates if all((layer, s) in table.errors for layer in layers)]
        bits = [sum(table.errors[(layer, s)].storage_bits for layer in layers) for s in schemes]
        costs = [sum(table.cost(layer, s, metric) for layer in layers) for s in schemes]
        kept = undominated(list(zip(bits, costs)))
        for layer in layers:
            keep[layer] = [schemes[i] for i in kept]
    return keep


def neighbour_candidates(table: SensitivityTable, metric: str, ties, schemes: dict[str, str],
                         width: int = 1) -> dict[str, list[str]]:
    """Layer → the scheme the allocation gave it and the `width` frontier options either side of it by size:
    where one re-allocation usually moves a layer. Far fewer pairs than the whole frontier; a layer that jumps
    further is measured in the next round."""
    frontier = frontier_candidates(table, metric, ties)
    keep: dict[str, list[str]] = {}
    for layers in tie_groups(list(table.layers), ties):
        chosen = schemes[layers[0]]
        options = frontier[layers[0]] + ([chosen] if chosen not in frontier[layers[0]] else [])
        ordered = sorted(options, key=lambda s: sum(table.errors[(layer, s)].storage_bits for layer in layers))
        at = ordered.index(chosen)
        for layer in layers:
            keep[layer] = ordered[max(0, at - width):at + width + 1]
    return keep


def search_in_context(model: nn.Module, input_ids: torch.Tensor, candidates_for: CandidatesFor, device: torch.device,
                      allocate: Callable[[SensitivityTable], Allocation], table: SensitivityTable, metric: str,
                      ties, max_rounds: int = 2, remeasure: str = "frontier", gradients: GradientStats | None = None,
                      block_tokens: int = 0, batch_size: int = 8, true_sequential: bool = True,
                      hessian: str = "compensated", cache: CandidateCache | None = None, progress: bool = True,
                      timer: StageTimer | None = None, experts: StarvedExperts = StarvedExperts(),
                      scaling: ScalingOptions = ScalingOptions(),
                      autoround: AutoRoundOptions = AutoRoundOptions()) -> InContextSearch:
    """From `table` (round 0, measured on full-precision inputs): allocate, then re-measure in context and
    re-allocate until the allocation is stable (see the module docstring). The model ends quantized with the
    returned allocation; `quantized` holds its codes. `scaling` and `autoround`: the options of the schemes
    that scale or learn their block, in the measurements and the quantization alike."""
    methods = {"scaling": scaling, "autoround": autoround}
    allocation = allocate(table)
    layers = list(table.layers)
    snapshot = snapshot_linears(model, layers)
    rounds = [SearchRound(0, allocation, len(allocation.schemes), len(table.errors), 0.0)]
    seen = [allocation.schemes]
    for index in range(1, max_rounds + 1):
        started = time.perf_counter()
        restore_linears(model, snapshot)
        if remeasure == "frontier":
            wanted = frontier_candidates(table, metric, ties)
        elif remeasure == "neighbours":
            wanted = neighbour_candidates(table, metric, ties, allocation.schemes)
        else:
            wanted = {layer: table.schemes_of(layer) for layer in layers}
        measure = SensitivityStage(lambda name: [Scheme.parse(s) for s in wanted.get(name, []) if s != KEEP], cache,
                                   gradients, block_tokens, experts, **methods)
        quantize = QuantizeStage(scheme_lookup(allocation.schemes), true_sequential, hessian, experts=experts,
                                 **methods)
        drive_blocks(model, input_ids, device, [measure, quantize], batch_size, progress, timer,
                     desc=f"in context, round {index}")
        table = table.updated(measure.layers, measure.errors, round=index)
        new = allocate(table)
        changed = sum(new.schemes[layer] != allocation.schemes[layer] for layer in allocation.schemes)
        rounds.append(SearchRound(index, new, changed, len(measure.errors), time.perf_counter() - started))
        log.info("in-context round %d: %d pairs re-measured, %d layers changed, objective %.4g", index,
                 len(measure.errors), changed, new.objective)
        if changed == 0:
            return InContextSearch(table, new, quantize.results, rounds, True, quantize.starved_experts,
                                   quantize.scaled)
        if new.schemes in seen:
            log.info("in-context search: allocation of an earlier round came back; stopping")
            allocation = new
            break
        seen.append(new.schemes)
        allocation = new
    restore_linears(model, snapshot)
    final = QuantizeStage(scheme_lookup(allocation.schemes), true_sequential, hessian, experts=experts, **methods)
    drive_blocks(model, input_ids, device, [final], batch_size, progress, timer, desc="quantize blocks")
    return InContextSearch(table, allocation, final.results, rounds, False, final.starved_experts, final.scaled)

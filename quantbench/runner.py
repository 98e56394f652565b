"""The `run` chain: recipe → model → baseline eval → calibration → transforms → quantization → eval →
export → result."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from quantbench import memory
from quantbench.allocation.ilp import Allocation
from quantbench.allocation.pareto import frontier, uniform_points, write_frontier
from quantbench.allocation.in_context import search_in_context
from quantbench.allocation.search import allocate, candidates_for, gradients_for, measure_sensitivity, sweep
from quantbench.allocation.sensitivity import CandidateCache, allocated_weights, apply_allocation
from quantbench.allocation.table import SensitivityTable
from quantbench.calibration import calibration_batches
from quantbench.distributed import current as current_ranks
from quantbench.errors import QuantbenchError
from quantbench.eval.harness import evaluate_perplexity, evaluate_tasks, tokenize_eval_sets
from quantbench.export.checkpoint import RUN_CHECKPOINT_DIR, save_quantized, write_checkpoint
from quantbench.export.targets import NATIVE, export_checkpoint
from quantbench.fsutil import atomic_directory
from quantbench.model_io import handle_nonfinite_weights, load_model, model_linears, resolve_device, resolve_dtype
from quantbench.preflight import preflight
from quantbench.pipeline import StageTimer, quantize_linear, quantize_model, untie_lm_head
from quantbench.quantizers import needs_stats
from quantbench.recipe import KEEP, Recipe
from quantbench.scheme import Scheme
from quantbench.results import environment, parameter_count, quantization_summary
from quantbench.rotation import max_logit_change, rotate_model

log = logging.getLogger(__name__)
RESULT_FILE = "result.json"
ALLOCATION_FILE = "allocation.yaml"
PROBE_TOKENS = 256  # tokens of the first calibration sequence on which a transform's exactness is checked


def run_recipe(recipe: Recipe, force: bool = False, progress: bool = True, resume: bool = False) -> dict:
    """Run a whole recipe; returns the result that is also written to `<run dir>/result.json`.

    Everything knowable up front is checked first (`preflight`), which also decides whether the run
    streams the model from disk (stream_runner.py; `resume` continues a streamed run that died). A failure
    that can only come at the end (an interop export refusing what the weights turned out to be) keeps
    what was computed: the run directory is written with the native checkpoint and result.json, then the
    error is raised."""
    run_dir = recipe.run_dir
    started = time.perf_counter()
    plan = preflight(recipe, force)
    ranks = current_ranks()
    if ranks.active:
        progress = progress and ranks.main
    for line in plan.summary().splitlines():
        log.info("preflight: %s", line)
    if plan.streaming:
        from quantbench.stream_runner import run_streaming

        return run_streaming(recipe, force, progress, resume)
    if resume:
        raise QuantbenchError(f"recipe {recipe.name} does not stream, so there is nothing to resume (only streamed "
                              "runs keep a journal); set model.streaming: on, or run without --resume")
    device = resolve_device(recipe.model.device)
    dtype = resolve_dtype(recipe.model.dtype, device)
    timer = StageTimer(device, memory=True)

    with timer("load"):
        model, tokenizer, repaired = load_checked_model(recipe, dtype)
    with timer("eval_data"):
        eval_ids = tokenize_eval_sets(tokenizer, recipe.eval.perplexity)

    baseline, baseline_tasks = {}, None
    if recipe.eval.baseline:
        with timer("eval_baseline"):
            baseline = evaluate_perplexity(model, eval_ids, recipe.eval, device, progress)
        if recipe.eval.tasks:
            with timer("tasks_baseline"):
                baseline_tasks = evaluate_tasks(model, tokenizer, recipe.eval, device, progress)

    with timer("calibration"):
        cal = recipe.calibration
        input_ids = recipe_calibration_ids(recipe, tokenizer)
    transforms = []
    for spec in recipe.transforms:
        with timer("transforms"):
            transforms.append(apply_transform(model, spec, input_ids[:1, :PROBE_TOKENS]))
    stages = StageTimer(device)
    searched, starved, scaled = None, {}, {}
    with timer("quantize"):
        if recipe.allocation is not None:
            searched = search_allocation(model, input_ids, recipe, device, stages, progress,
                                         score=lambda: evaluate_perplexity(model, eval_ids, recipe.eval, device, False))
            quantized, starved, scaled = searched.quantized, searched.starved_experts, searched.scaled
        else:
            quantized = quantize_model(model, input_ids, recipe.quantize.scheme_for, device,
                                       batch_size=cal.batch_size, progress=progress,
                                       true_sequential=recipe.quantize.true_sequential, timer=stages,
                                       hessian=recipe.quantize.hessian, experts=recipe.quantize.experts.policy(),
                                       starved=starved, scaled=scaled, **recipe.block_methods())
        if recipe.quantize.lm_head is not None:
            quantized["lm_head"] = quantize_linear(untie_lm_head(model), recipe.quantize.lm_head)
    with timer("eval_quantized"):
        quantized_ppl = evaluate_perplexity(model, eval_ids, recipe.eval, device, progress)
    quantized_tasks = None
    if recipe.eval.tasks:
        with timer("tasks_quantized"):
            quantized_tasks = evaluate_tasks(model, tokenizer, recipe.eval, device, progress)
    if not ranks.main:  # rank 0 writes the run directory
        return {}

    linears = model_linears(model)
    result = {
        **result_head(recipe, model, dtype),
        "transforms": transforms,
        "quantization": quantization_summary(model, quantized, linears),
        "nonfinite_weights_zeroed": repaired,
        "starved_experts": starved,
        "scaled": scaled,
        "perplexity": {"baseline": baseline, "quantized": quantized_ppl},
        "ranks": ranks.world,
    }
    if recipe.eval.tasks:
        result["tasks"] = {"baseline": baseline_tasks, "quantized": quantized_tasks}
    if searched is not None:
        result["allocation"] = searched.record()
    interop_error = None
    with atomic_directory(run_dir, force, "run directory") as tmp:
        if searched is not None:
            searched.write(tmp)
        if recipe.export.enabled:
            with timer("export"):
                if recipe.export.dir:
                    save_quantized(model, tokenizer, quantized, recipe.export_dir, force=force)
                else:
                    write_checkpoint(model, tokenizer, quantized, tmp / RUN_CHECKPOINT_DIR)
                result["checkpoint"] = str(recipe.export_dir)
                native = recipe.export_dir if recipe.export.dir else tmp / RUN_CHECKPOINT_DIR
                interop_error = interop_export(recipe, native, tmp, result)
        finish_result(result, recipe, tmp, timer, stages, device, started)
    if interop_error is not None:
        raise kept_results_error(interop_error, recipe)
    return result


def kept_results_error(error: QuantbenchError, recipe: Recipe) -> QuantbenchError:
    """An interop export refused what the weights turned out to be, after the run's results were written."""
    return QuantbenchError(f"{error}\nthe run's results are kept: {recipe.run_dir / RESULT_FILE} and the native "
                           f"checkpoint {recipe.export_dir}")


def recipe_calibration_ids(recipe: Recipe, tokenizer) -> torch.Tensor:
    """The recipe's calibration windows [n_samples, seqlen]."""
    cal = recipe.calibration
    return calibration_batches(tokenizer, cal.source, cal.n_samples, cal.seqlen, cal.seed, split=cal.split,
                               text_field=cal.text_field)


def result_head(recipe: Recipe, model, dtype: torch.dtype) -> dict:
    """What every result.json opens with: the recipe, the model and the calibration."""
    cal = recipe.calibration
    return {"name": recipe.name, "recipe": recipe.canonical(), "recipe_hash": recipe.hash(),
            "model": recipe.model.name, "dtype": str(dtype).removeprefix("torch."),
            "parameters": parameter_count(model),
            "calibration": {"source": cal.source, "n_samples": cal.n_samples, "seqlen": cal.seqlen, "seed": cal.seed}}


def interop_export(recipe: Recipe, native: Path, run_tmp: Path, result: dict) -> QuantbenchError | None:
    """Write the interop checkpoint the recipe asks for beside the native one; a refusal is returned (and
    recorded in `result`), to be raised once the run's results are safe."""
    if recipe.export.format == NATIVE:
        return None
    interop = f"{RUN_CHECKPOINT_DIR}-{recipe.export.format}"
    try:
        export_checkpoint(recipe.export.format, native, run_tmp / interop, device=resolve_device(recipe.model.device))
    except QuantbenchError as exc:
        result["interop_error"] = str(exc)
        return exc
    result["interop_checkpoint"] = str(recipe.run_dir / interop)
    return None


def finish_result(result: dict, recipe: Recipe, run_tmp: Path, timer: StageTimer, breakdown: StageTimer,
                  device: torch.device, started: float) -> None:
    """Timings, peak memory (overall and per stage) and environment; write result.json and recipe.yaml."""
    timer.seconds["total"] = time.perf_counter() - started
    result.update(timings_s=timer.summary(), quantize_breakdown_s=breakdown.summary(),
                  peak_memory=memory.overall(timer.peaks), peak_memory_by_stage=timer.peaks,
                  environment=environment(device), finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    (run_tmp / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
    (run_tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe.canonical(), sort_keys=False))


def load_checked_model(recipe: Recipe, dtype: torch.dtype):
    """The recipe's model and tokenizer, its weights checked for NaN/inf (`model.nonfinite_weights`); the
    third value names the parameters that were zeroed."""
    model, tokenizer = load_model(recipe.model.name, dtype, recipe.model.trust_remote_code)
    return model, tokenizer, handle_nonfinite_weights(model, recipe.model.nonfinite_weights)


@dataclass
class SearchedAllocation:
    """What the allocation search of a run produced, kept until the run directory is written."""

    table: SensitivityTable
    allocation: Allocation
    quantized: dict
    frontier: list[dict] = field(default_factory=list)
    uniform: list[dict] = field(default_factory=list)
    evaluated: list[dict] = field(default_factory=list)
    rounds: list[dict] = field(default_factory=list)
    converged: bool | None = None
    starved_experts: dict = field(default_factory=dict)
    scaled: dict = field(default_factory=dict)

    def record(self) -> dict:
        return {**self.allocation.summary(), "schemes": self.allocation.scheme_counts(),
                "layers": self.allocation.schemes, "evaluated": self.evaluated, "rounds": self.rounds,
                "converged": self.converged,
                "frontier": [{k: p[k] for k in ("budget", "feasible", "bits_per_weight", "objective") if k in p}
                             for p in self.frontier]}

    def write(self, directory: Path) -> None:
        self.table.save(directory)
        self.allocation.save(directory / ALLOCATION_FILE)
        if self.frontier:
            write_frontier(directory, self.allocation.metric, self.frontier, self.uniform, self.evaluated)


def search_allocation(model, input_ids, recipe: Recipe, device, stages: StageTimer, progress: bool,
                      score) -> SearchedAllocation:
    """Gradients (when a measure needs them) → sensitivity on full-precision inputs → allocation (→ sweep,
    scoring its chosen budgets with `score()`) → the in-context rounds, which end with the model quantized
    block by block under the final allocation (`rounds: 0` quantizes once with the first allocation;
    `requantize: false` applies the candidates' cached codes instead)."""
    section = recipe.allocation
    cache = CandidateCache()
    with stages("gradients"):
        gradients = gradients_for(model, input_ids, recipe, device, progress)
    with stages("sensitivity"):
        table = measure_sensitivity(model, input_ids, recipe, device, progress, cache, gradients)
    with stages("allocate"):
        allocation = allocate(table, section)
    log.info("allocation: %s, %.4f bits per weight, objective %.4g (%s)", allocation.status,
             allocation.bits_per_weight, allocation.objective, ", ".join(f"{k} ×{v}" for k, v in
                                                                        allocation.scheme_counts().items()))
    searched = SearchedAllocation(table, allocation, {})
    if section.sweep is not None:
        with stages("sweep"):
            budgets = section.sweep.budgets
            searched.frontier = frontier(budgets, sweep(table, section, budgets))
            searched.uniform = uniform_points(table, section.metric)
        for budget in section.sweep.evaluate:
            with stages("sweep_eval"):
                point = allocate(table, section, budget=budget)
                with allocated_weights(model, point.schemes, cache):
                    ppl = score()
            for dataset, value in ppl.items():
                searched.evaluated.append({"label": f"ILP ({dataset})", "budget": budget, "dataset": dataset,
                                           "bits_per_weight": point.bits_per_weight, "ppl": value["ppl"]})
    if not section.requantize:  # the candidates' codes, measured with the sensitivity stage's statistics
        searched.quantized = apply_allocation(model, allocation.schemes, cache)
        searched.starved_experts = {name: note for name, note in table.meta.get("starved_experts", {}).items()
                                    if allocation.schemes.get(name, KEEP) != KEEP
                                    and needs_stats(Scheme.parse(allocation.schemes[name]))}
        return searched
    with stages("in_context"):
        found = search_in_context(model, input_ids, candidates_for(recipe), device,
                                  lambda t: allocate(t, section), table, section.metric, section.ties,
                                  max_rounds=section.rounds, remeasure=section.remeasure, gradients=gradients,
                                  block_tokens=section.block_tokens if "block_output" in section.measures else 0,
                                  batch_size=recipe.calibration.batch_size,
                                  true_sequential=recipe.quantize.true_sequential, hessian=recipe.quantize.hessian,
                                  cache=cache, progress=progress, timer=stages,
                                  experts=recipe.quantize.experts.policy(), **recipe.block_methods())
    searched.table, searched.allocation, searched.quantized = found.table, found.allocation, found.quantized
    searched.rounds, searched.converged = [r.record() for r in found.rounds], found.converged
    searched.starved_experts, searched.scaled = found.starved_experts, found.scaled
    return searched


def sensitivity_for_recipe(recipe: Recipe, progress: bool = True) -> SensitivityTable:
    """The sensitivity stage alone: model, calibration data and transforms as `run` prepares them."""
    if recipe.allocation is None:
        raise QuantbenchError(f"recipe {recipe.name} has no allocation section; add one with its candidates "
                              "(see recipes/ilp-3bit.yaml)")
    device = resolve_device(recipe.model.device)
    model, tokenizer, _ = load_checked_model(recipe, resolve_dtype(recipe.model.dtype, device))
    input_ids = recipe_calibration_ids(recipe, tokenizer)
    for spec in recipe.transforms:
        apply_transform(model, spec, input_ids[:1, :PROBE_TOKENS])
    return measure_sensitivity(model, input_ids, recipe, device, progress,
                               gradients=gradients_for(model, input_ids, recipe, device, progress))


def apply_transform(model, spec, probe_ids) -> dict:
    """Apply a recipe transform and measure how far it moved the logits on `probe_ids` (it should not)."""
    with torch.no_grad():
        reference = model(input_ids=probe_ids).logits
    descriptor = rotate_model(model, seed=spec.seed, online_down_proj=spec.online_down_proj)
    change = max_logit_change(model, probe_ids, reference)
    log.info("model rotated (%s); max |Δlogit| on %d probe tokens: %.2e", descriptor["kind"], probe_ids.numel(), change)
    return {"name": spec.name, **descriptor, "max_abs_logit_change": change,
            "max_abs_logit": reference.abs().max().item()}


def read_result(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / RESULT_FILE).read_text())

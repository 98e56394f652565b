"""Does the searched mix beat every uniform scheme of equal size? One run, on one model and one calibration seed:

  1. full-precision perplexity on three sets: WikiText-2's first and last windows, and held-out C4
     (documents the calibration never drew from; bench/allocation_data.py makes the ids);
  2. every --uniform scheme through the pipeline (GPTQ in context, as `run` quantizes);
  3. gradients and round 0 of the sensitivity (every candidate on full-precision inputs), and the Spearman
     correlation of every measure with measured Δppl, for single-layer changes and for whole random
     allocations around the budgets (applied from the cached codes: same codes for every measure);
  4. per budget: the ILP with --rounds in-context rounds (the searched mix) and the baselines (the ILP on
     round-0 costs, greedy, the knapsack DP), each quantized through the pipeline and scored.

Stages uniform (1-2), measure (3) and search (4) can run as separate calls; they share --work.

    python bench/allocation_data.py --out .gpu/ids --seeds 0 1 2
    for seed in 0 1 2; do
      python bench/allocation_search.py --model .assets/models/smollm2-135m-dithered --ids .gpu/ids \
          --seed $seed --device cuda --out runs/bench-allocation-search/seed$seed
    done
    python bench/allocation_summary.py runs/bench-allocation-search/seed*

Writes allocation_search.json (every figure) and prints a line per result as it goes.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import torch
from allocation import spearman
from safetensors.torch import load_file

from quantbench.allocation.baselines import solve_greedy, solve_knapsack_dp, solve_random
from quantbench.allocation.gradients import GradientStats, gradient_stats
from quantbench.allocation.ilp import solve_ilp
from quantbench.allocation.in_context import scheme_lookup, search_in_context
from quantbench.allocation.problem import DEFAULT_TIES, build_problem
from quantbench.allocation.sensitivity import CandidateCache, allocated_weights, sensitivity_table
from quantbench.allocation.table import GRADIENT_METRICS, SensitivityTable
from quantbench.eval.perplexity import perplexity_of_ids
from quantbench.model_io import load_model, model_linears, resolve_device
from quantbench.pipeline import StageTimer, quantize_model
from quantbench.results import environment
from quantbench.scheme import Scheme

CANDIDATES = ["hadamard+int2-pc-gptq", "hadamard+int2-g128-gptq", "int2-g64-gptq", "hadamard+int2-g64-gptq",
              "hadamard+int2-g32-gptq", "hadamard+int3-pc-gptq", "int3-g128-gptq", "hadamard+int3-g128-gptq",
              "hadamard+int3-g128-gptq-act-static", "hadamard+int3-g64-gptq", "hadamard+int3-g32-gptq",
              "ternary2-g128-ptqtp", "hadamard+int4-pc-gptq", "int4-g128-gptq", "hadamard+int4-g128-gptq",
              "hadamard+int4-g64-gptq", "mxfp4-gptq", "nvfp4-gptq", "hadamard+int5-g128-gptq", "mxfp6e2m3-rtn",
              "int8-pc-rtn"]
# The searched mixes' candidates (those of recipes/ilp-in-context.yaml): Hadamard + GPTQ with activation order
# (static groups where there are groups) from int2 g64 to int5 g128, stepping through the sizes, and int8.
SEARCH = ["hadamard+int2-g64-gptq-act-static", "hadamard+int2-g32-gptq-act-static", "hadamard+int3-pc-gptq",
          "hadamard+int3-g128-gptq-act-static", "hadamard+int3-g64-gptq-act-static",
          "hadamard+int3-g32-gptq-act-static", "hadamard+int4-pc-gptq-act", "hadamard+int4-g128-gptq-act-static",
          "hadamard+int5-g128-gptq-act-static", "int8-pc-rtn"]
KEEP_BITS = 16  # a layer kept in full precision is stored in bf16/fp16
TIES = {"fused": DEFAULT_TIES, "none": ()}
LOCAL_METRICS = ["output_error", "xtx_trace"]


def eval_sets(ids_dir: Path, windows: int, seqlen: int) -> dict[str, torch.Tensor]:
    wiki = load_file(str(ids_dir / "wikitext2.safetensors"))["input_ids"]
    c4 = load_file(str(ids_dir / "c4_heldout.safetensors"))["input_ids"]
    span = windows * seqlen
    return {"wikitext2_first": wiki[:span], "wikitext2_last": wiki[len(wiki) // seqlen * seqlen - span:len(wiki) // seqlen * seqlen],
            "c4_heldout": c4[:min(span, len(c4) // seqlen * seqlen)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=".assets/models/smollm2-135m-dithered")
    parser.add_argument("--ids", required=True, help="folder written by bench/allocation_data.py")
    parser.add_argument("--seed", type=int, default=0, help="which calibration draw (calibration_seed{k})")
    parser.add_argument("--no-keep", action="store_true", help="do not offer keeping a layer in 16 bits")
    parser.add_argument("--no-correlations", action="store_true", help="skip the Spearman measurements")
    parser.add_argument("--candidates", nargs="+", default=SEARCH, help="the searched mixes' per-layer options")
    parser.add_argument("--ties", choices=tuple(TIES), default="none",
                        help="fused: q/k/v and gate/up share a scheme (what fused serving kernels need)")
    parser.add_argument("--budgets", nargs="+", type=float, default=[2.5, 3.0, 3.25, 3.5, 4.0, 4.25])
    parser.add_argument("--metrics", nargs="*", default=["block_output"],
                        help="measures the searched mixes minimise (each is searched at every budget)")
    parser.add_argument("--rounds", type=int, default=1, help="in-context rounds after round 0 (0: none)")
    parser.add_argument("--remeasure", choices=("frontier", "neighbours", "all"), default="frontier")
    parser.add_argument("--solvers", nargs="+", default=["ilp", "greedy", "knapsack_dp"],
                        choices=("ilp", "round0", "greedy", "knapsack_dp"),
                        help="ilp: the searched mix (with --rounds in-context rounds); round0: the ILP on round-0 "
                             "costs; greedy, knapsack_dp: on the searched mix's final costs (round 0 without ilp)")
    parser.add_argument("--gradient-samples", type=int, default=32)
    parser.add_argument("--block-tokens", type=int, default=16384, help="0: no block_output measure")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--random-allocations", type=int, default=24)
    parser.add_argument("--single-layer", type=int, default=40)
    parser.add_argument("--uniform", nargs="*", default=CANDIDATES,
                        help="uniform schemes to run (default: every scheme the library offers at 2-8 bits)")
    parser.add_argument("--stage", choices=("all", "prepare", "uniform", "measure", "search"), default="all",
                        help="uniform: every --uniform scheme through the pipeline; measure: gradients, round 0 and "
                             "the correlations (kept in --work); prepare: both; search: the searches at --budgets "
                             "from what measure kept")
    parser.add_argument("--work", help="folder for what the stages share (default --out)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="runs/bench-allocation-search")
    args = parser.parse_args()
    from quantbench.quiet import quiet_libraries

    quiet_libraries()
    torch.set_grad_enabled(False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or out)
    work.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    calibration = load_file(str(Path(args.ids) / f"calibration_seed{args.seed}.safetensors"))["input_ids"]
    sets = eval_sets(Path(args.ids), args.windows, args.seqlen)
    pristine, _ = load_model(args.model, torch.float32)
    pristine.to(device)
    candidates = [Scheme.parse(name) for name in args.candidates]
    layers = list(model_linears(pristine))
    report_path = work / "allocation_search.json"
    resume = args.stage in ("measure", "search") and report_path.is_file()
    report: dict = json.loads(report_path.read_text()) if resume else {
        "model": args.model, "device": environment(device)["device_name"], "torch": torch.__version__,
        "calibration": list(calibration.shape), "seed": args.seed, "windows": args.windows,
        "eval_tokens": {k: v.numel() for k, v in sets.items()}, "candidates": args.candidates,
        "date": time.strftime("%Y-%m-%d")}

    def save() -> None:
        text = json.dumps(report, indent=1) + "\n"
        report_path.write_text(text)
        (out / "allocation_search.json").write_text(text)

    def show(row: dict) -> None:
        print(json.dumps(row), flush=True)

    def perplexities(model) -> dict[str, float]:
        return {name: round(perplexity_of_ids(model, ids, args.seqlen, batch_size=4).ppl, 3)
                for name, ids in sets.items()}

    def through_pipeline(schemes: dict[str, str]) -> tuple[dict, float, float]:
        model = copy.deepcopy(pristine)
        started = time.perf_counter()
        quantized = quantize_model(model, calibration, scheme_lookup(schemes), device, progress=False)
        seconds = time.perf_counter() - started
        kept = [layer for layer in schemes if layer not in quantized]
        numel = {layer: module.weight.numel() for layer, module in model.named_modules() if layer in kept}
        bits = ((sum(q.storage_bits for q in quantized.values()) + KEEP_BITS * sum(numel.values()))
                / (sum(q.numel for q in quantized.values()) + sum(numel.values())))
        result = perplexities(model)
        del model
        return result, bits, seconds

    if args.stage in ("all", "prepare", "uniform"):
        uniform(args, report, pristine, layers, perplexities, through_pipeline, save, show)
    if args.stage in ("all", "prepare", "measure"):
        measure(args, report, pristine, calibration, sets, candidates, layers, device, work, save, show)
    if args.stage in ("all", "search"):
        gradients = GradientStats.load(work / "gradients.safetensors")
        table0 = SensitivityTable.load(work / "round0")
        if not args.no_keep:
            table0 = table0.with_keep({layer: KEEP_BITS for layer in table0.layers})
        search(args, report, pristine, calibration, candidates, table0, gradients, device, perplexities,
               through_pipeline, save, show)
    plot(report, out)
    print(f"wrote {out / 'allocation_search.json'}")


def uniform(args, report, pristine, layers, perplexities, through_pipeline, save, show) -> None:
    """Full precision, and every --uniform scheme through the pipeline."""
    report["full_precision"] = perplexities(pristine)
    show({"full_precision": report["full_precision"]})
    report["uniform"] = []
    for name in args.uniform:
        ppl, bits, seconds = through_pipeline({layer: name for layer in layers})
        report["uniform"].append({"scheme": name, "bits_per_weight": round(bits, 4), "ppl": ppl,
                                  "quantize_seconds": round(seconds, 2)})
        show(report["uniform"][-1])
        save()


def measure(args, report, pristine, calibration, sets, candidates, layers, device, work, save, show) -> None:
    """Gradients, round 0 of the sensitivity (every candidate on full-precision inputs), correlations."""
    report["candidates"] = args.candidates
    started = time.perf_counter()
    gradients = gradient_stats(pristine, calibration[:args.gradient_samples], layers, device, progress=False)
    seconds = {"gradients": round(time.perf_counter() - started, 2)}
    gradients.save(work / "gradients.safetensors")
    cache = CandidateCache()
    started = time.perf_counter()
    table0 = sensitivity_table(pristine, calibration, lambda name: candidates, device, progress=False, cache=cache,
                               gradients=gradients, block_tokens=args.block_tokens)
    seconds["round0"] = round(time.perf_counter() - started, 2)
    report["search_seconds"] = seconds
    show({"seconds": seconds})
    table0.save(work / "round0")
    save()
    if not args.no_correlations:
        correlations(args, report, table0, cache, pristine, sets, layers, show)
        save()


def search(args, report, pristine, calibration, candidates, table0, gradients, device, perplexities,
           through_pipeline, save, show) -> None:
    """Per budget and metric: the in-context search, and the baselines through the pipeline."""
    timer = StageTimer(device)

    ties = TIES[args.ties]
    tied = ", fused layers tied" if ties else ""

    def allocate(metric: str, budget: float, solver=solve_ilp):
        return lambda table: solver(build_problem(table, metric, budget_bits=budget, ties=ties))

    report.setdefault("searched", [])
    for budget in args.budgets:
        for metric in args.metrics:
            final, costs = table0, ""
            if "ilp" in args.solvers:
                model = copy.deepcopy(pristine)
                started = time.perf_counter()
                found = search_in_context(model, calibration, lambda name: candidates, device,
                                          allocate(metric, budget), table0, metric, ties, max_rounds=args.rounds,
                                          remeasure=args.remeasure, gradients=gradients,
                                          block_tokens=args.block_tokens, cache=CandidateCache(), progress=False,
                                          timer=timer)
                context = f", {args.rounds} in-context round{'s' if args.rounds > 1 else ''}" if args.rounds else ""
                row = {"budget": budget, "metric": metric, "solver": f"ilp{context}{tied}", "ties": args.ties,
                       "remeasure": args.remeasure,
                       "bits_per_weight": round(found.allocation.bits_per_weight, 4), "ppl": perplexities(model),
                       "rounds": [r.record() for r in found.rounds], "converged": found.converged,
                       "search_seconds": round(time.perf_counter() - started, 2),
                       "schemes": found.allocation.scheme_counts(), "layers": found.allocation.schemes}
                del model
                report["searched"].append(row)
                show({k: v for k, v in row.items() if k != "layers"})
                save()
                final, costs = found.table, (", in-context costs" if args.rounds else "")
            runs = {"round0": (f"ilp, round 0 costs{tied}", lambda: allocate(metric, budget)(table0)),
                    "greedy": (f"greedy{costs}{tied}", lambda: allocate(metric, budget, solve_greedy)(final)),
                    "knapsack_dp": (f"knapsack DP{costs}{tied}",
                                    lambda: allocate(metric, budget, solve_knapsack_dp)(final))}
            for key in [s for s in args.solvers if s != "ilp"]:
                label, solve = runs[key]
                allocation = solve()
                ppl, bits, _ = through_pipeline(allocation.schemes)
                report["searched"].append({"budget": budget, "metric": metric, "solver": label,
                                           "bits_per_weight": round(bits, 4), "ppl": ppl,
                                           "objective": allocation.objective,
                                           "schemes": allocation.scheme_counts(), "layers": allocation.schemes})
                show({k: v for k, v in report["searched"][-1].items() if k != "layers"})
                save()


def correlations(args, report, table, cache, model, sets, layers, show) -> None:
    """Spearman of each measure's predicted cost with the measured Δppl (first eval set), the codes applied
    from the round-0 cache so every measure is judged on the same allocations."""
    metrics = [m for m in [*LOCAL_METRICS, *GRADIENT_METRICS, "kfac"] if m in table.available_metrics()]
    name, ids = next(iter(sets.items()))
    base = report["full_precision"][name]

    def delta(schemes: dict[str, str]) -> float:
        with allocated_weights(model, schemes, cache):
            return perplexity_of_ids(model, ids, args.seqlen, batch_size=4).ppl - base

    rng = random.Random(0)
    low_bit = [c for c in table.candidates if Scheme.parse(c).bits_per_weight < 4]  # visible Δppl
    singles = []
    for _ in range(args.single_layer):
        layer, scheme = rng.choice(layers), rng.choice(low_bit)
        singles.append({"layer": layer, "scheme": scheme, "delta_ppl": delta({layer: scheme}),
                        **{m: table.cost(layer, scheme, m) for m in metrics}})
    wholes = []
    for index in range(args.random_allocations):
        budget = args.budgets[index % len(args.budgets)]
        allocation = solve_random(build_problem(table, metrics[0], budget_bits=budget), seed=index)
        wholes.append({"budget": budget, "delta_ppl": delta(allocation.schemes),
                       **{m: sum(table.cost(layer, s, m) for layer, s in allocation.schemes.items()) for m in metrics}})
    report["spearman"] = {
        kind: {m: round(spearman([r[m] for r in rows], [r["delta_ppl"] for r in rows]), 3) for m in metrics}
        for kind, rows in (("single_layer", singles), ("whole_allocation", wholes))}
    report["single_layer"], report["whole_allocations"] = singles, wholes
    show({"spearman": report["spearman"]})


def plot(report: dict, out: Path) -> None:
    """Measured perplexity vs size per eval set: uniform schemes, the searched mixes and the baselines."""
    from quantbench.allocation.pareto import plot_measured

    for name, base in report.get("full_precision", {}).items():
        uniform = [{"scheme": u["scheme"], "bits_per_weight": u["bits_per_weight"], "ppl": u["ppl"][name]}
                   for u in report.get("uniform", [])]
        series: dict[str, list] = {}
        for row in report.get("searched", []):
            series.setdefault(f"{row['solver']} ({row['metric']})", []).append((row["bits_per_weight"],
                                                                              row["ppl"][name]))
        plot_measured(out / f"allocation_search_{name}.png", base, uniform, series,
                      f"{Path(report['model']).name}: {name}, calibration {report['calibration']}")


if __name__ == "__main__":
    main()

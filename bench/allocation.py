"""Does the allocation search pay? One sensitivity pass, then WikiText-2 perplexity of: every uniform
candidate, the ILP at each budget under every metric, greedy / knapsack DP / random allocations at the
same budgets; the Spearman correlation of each metric's predicted cost with the measured Δppl of
single-layer quantizations; and ILP solve times.

    python bench/allocation.py --model .assets/models/smollm2-135m-dithered --windows 16 --device cuda \
        --out runs/bench-allocation

Allocations are applied from the candidates' cached codes (GPTQ on full-precision inputs, as the
sensitivity pass quantized them); `--requantize` also runs the chosen ILP allocations and the uniform
int3/int4 g128 schemes through the block-by-block pipeline (inputs from the quantized earlier blocks),
as `run` does with `allocation.requantize: true` and without an allocation.
Token ids as in ppl_ladder.py (`--calibration-ids`, `--eval-ids` where `datasets` is missing).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

import torch
from ppl_ladder import add_token_id_arguments, token_ids

from quantbench.allocation.baselines import solve_greedy, solve_knapsack_dp, solve_random
from quantbench.allocation.ilp import solve_ilp
from quantbench.allocation.pareto import uniform_points
from quantbench.allocation.problem import DEFAULT_TIES, Item, Option, Problem, build_problem
from quantbench.allocation.sensitivity import CandidateCache, HessianOptions, allocated_weights, sensitivity_table
from quantbench.allocation.table import SensitivityTable
from quantbench.eval.perplexity import perplexity_of_ids
from quantbench.model_io import load_model, resolve_device
from quantbench.pipeline import quantize_model
from quantbench.results import environment
from quantbench.scheme import Scheme

CANDIDATES = ["int2-g128-gptq", "hadamard+int2-g128-gptq", "hadamard+int3-pc-gptq", "int3-g128-gptq",
              "hadamard+int3-g128-gptq", "ternary2-ptqtp", "int4-g128-gptq", "hadamard+int4-g128-gptq", "mxfp4-gptq",
              "int8-pc-rtn"]
SINGLE_LAYER_SCHEMES = ["int2-g128-gptq", "hadamard+int2-g128-gptq", "int3-g128-gptq", "ternary2-ptqtp"]


def synthetic_problem(items: int, options: int, seed: int = 0, budget: float = 3.5) -> Problem:
    rng = random.Random(seed)
    built = []
    for i in range(items):
        numel = rng.choice([576 * 576, 576 * 192, 576 * 1536])
        sensitivity = 10 ** rng.uniform(-2, 2)
        opts = [Option(f"s{o}", sensitivity * numel * 4.0 ** -(2 + 6 * o / (options - 1)) * rng.uniform(0.5, 1.5),
                       int((2 + 6 * o / (options - 1) + rng.uniform(0, 0.3)) * numel)) for o in range(options)]
        built.append(Item(f"l{i}", [f"l{i}"], numel, opts))
    return Problem(built, budget * sum(item.numel for item in built))


def spearman(xs: list[float], ys: list[float]) -> float:
    """Rank correlation (ties get their mean rank)."""
    def ranks(values: list[float]) -> torch.Tensor:
        v = torch.tensor(values, dtype=torch.float64)
        return (v[:, None] > v[None, :]).sum(1) + ((v[:, None] == v[None, :]).sum(1) - 1) / 2

    a, b = ranks(xs).double(), ranks(ys).double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def measure(args, model, calibration, device, work: Path) -> tuple[SensitivityTable, CandidateCache]:
    """The sensitivity pass, saving the table (and the codes) after each phase."""
    candidates = [Scheme.parse(name) for name in args.candidates]
    cache, codes_saved = CandidateCache(), []

    def checkpoint(table: SensitivityTable) -> None:
        if not codes_saved:  # the codes are complete after the first phase
            cache.save(work / "codes.safetensors")
            codes_saved.append(True)
        table.save(work)
        print(json.dumps(table.meta), flush=True)

    table = sensitivity_table(model, calibration, lambda name: candidates if re.search(args.layers, name) else [],
                              device, measure=args.measures,
                              hessian=HessianOptions(samples=args.hessian_samples, seqlen=args.hessian_seqlen,
                                                     max_probes=args.max_probes, power_iters=args.power_iters),
                              kl_samples=args.kl_samples, cache=cache, after_phase=checkpoint)
    return table, cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--candidates", nargs="+", default=CANDIDATES)
    parser.add_argument("--budgets", nargs="+", type=float, default=[2.5, 3.0, 3.5])
    parser.add_argument("--layers", default="", help="regex: allocate only matching layers (CPU dry runs)")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--single-layer", type=int, default=40, help="single-layer quantizations for Spearman")
    parser.add_argument("--hessian-samples", type=int, default=4)
    parser.add_argument("--hessian-seqlen", type=int, default=512)
    parser.add_argument("--max-probes", type=int, default=32)
    parser.add_argument("--power-iters", type=int, default=10)
    parser.add_argument("--kl-samples", type=int, default=4)
    parser.add_argument("--requantize", action="store_true")
    parser.add_argument("--requantize-uniform", nargs="*", default=["int3-g128-gptq", "int4-g128-gptq"],
                        help="uniform schemes also run through the pipeline with --requantize")
    parser.add_argument("--measures", nargs="*", default=["trace", "eigenvalue", "kl"],
                        choices=("trace", "eigenvalue", "kl"), help="loss-Hessian and KL measures to take")
    parser.add_argument("--stage", choices=("all", "sensitivity", "evaluate", "requantize"), default="all",
                        help="sensitivity: measure and save the table and codes to --work; evaluate: load them")
    parser.add_argument("--work", help="folder for the table and the codes between stages (default --out)")
    add_token_id_arguments(parser, n_samples=128, calibration_seqlen=2048)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="runs/bench-allocation")
    args = parser.parse_args()
    from quantbench.quiet import quiet_libraries

    quiet_libraries()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    calibration, ids = token_ids(args)
    device = resolve_device(args.device)
    model, _ = load_model(args.model, torch.float32)
    model.to(device)
    report: dict = {"model": args.model, "device": environment(device)["device_name"], "windows": args.windows,
                    "calibration": list(calibration.shape), "candidates": args.candidates}

    def ppl() -> float:
        return round(perplexity_of_ids(model, ids, args.seqlen, args.windows, batch_size=4, dataset="wikitext2").ppl, 3)

    def save() -> None:
        (out / "allocation_bench.json").write_text(json.dumps(report, indent=1) + "\n")

    report["full_precision_ppl"] = ppl()
    work = Path(args.work or out)
    work.mkdir(parents=True, exist_ok=True)
    if args.stage in ("all", "sensitivity"):
        table, cache = measure(args, model, calibration, device, work)
        report["sensitivity_seconds"] = table.meta["seconds"]
        if args.stage == "sensitivity":
            table.save(out)
            print(json.dumps(table.meta), flush=True)
            return
    else:
        table, cache = SensitivityTable.load(work), CandidateCache.load(work / "codes.safetensors")
        report["sensitivity_seconds"] = table.meta["seconds"]
    table.save(out)
    probes = [info.hessian_probes for info in table.layers.values()]
    report["hutchinson"] = {"probes_mean": sum(probes) / len(probes),
                            "relative_stderr_median": sorted(info.hessian_trace_stderr / abs(info.hessian_trace)
                                                             for info in table.layers.values())[len(probes) // 2],
                            "eigenvalue_converged": sum(bool(i.eigenvalue_converged) for i in table.layers.values())}
    print(json.dumps({k: report[k] for k in ("full_precision_ppl", "sensitivity_seconds", "hutchinson")}), flush=True)
    save()

    def score(schemes: dict[str, str]) -> float:
        with allocated_weights(model, schemes, cache):
            return ppl()

    if args.stage != "requantize":
        evaluate(args, table, report, score, save)
    if args.requantize or args.stage == "requantize":
        requantize(args, table, calibration, ids, device, report, save)
    print(f"wrote {out / 'allocation_bench.json'}")


def evaluate(args, table, report, score, save) -> None:
    report["uniform"] = []
    for point in uniform_points(table, "output_error"):
        point["ppl"] = score({layer: point["scheme"] for layer in table.layers})
        report["uniform"].append(point)
        print(json.dumps(point), flush=True)
    save()

    report["allocations"] = []
    for budget in args.budgets:
        runs = []
        for metric in table.available_metrics():
            problem = build_problem(table, metric, budget_bits=budget)
            runs.append((metric, solve_ilp(problem)))
            if metric == "kfac":
                runs += [(metric, solve_greedy(problem)), (metric, solve_knapsack_dp(problem))]
                runs += [(metric, solve_random(problem, seed=seed)) for seed in range(3)]
        for metric, allocation in runs:
            row = {"budget": budget, "metric": metric, "solver": allocation.solver,
                   "bits_per_weight": round(allocation.bits_per_weight, 4), "objective": allocation.objective,
                   "solve_seconds": round(allocation.seconds, 3), "schemes": allocation.scheme_counts(),
                   "ppl": score(allocation.schemes)}
            report["allocations"].append(row)
            print(json.dumps(row), flush=True)
        save()

    timing = {}
    for label, names, ties in [("real, tied q/k/v and gate/up", args.candidates, DEFAULT_TIES),
                               ("real, untied", args.candidates, ()),
                               ("real, untied, 8 candidates", args.candidates[:8], ())]:
        keep = set(names)
        sub = type(table)(table.layers, {k: v for k, v in table.errors.items() if k[1] in keep},
                          [c for c in table.candidates if c in keep])
        problem = build_problem(sub, "kfac", budget_bits=3.0, ties=ties)
        timing[f"{label}: {len(problem.items)} items × {len(names)}"] = round(solve_ilp(problem).seconds, 3)
    big = synthetic_problem(1000, 12)
    timing["synthetic: 1000 items × 12"] = round(solve_ilp(big, time_limit=60).seconds, 3)
    report["solve_seconds"] = timing
    print(json.dumps(timing), flush=True)
    save()
    if not args.single_layer:
        return
    rng = random.Random(0)
    layers = list(table.layers)
    pairs = [(rng.choice(layers), rng.choice(SINGLE_LAYER_SCHEMES)) for _ in range(args.single_layer)]
    singles = []
    for layer, scheme in pairs:
        delta = score({layer: scheme}) - report["full_precision_ppl"]
        singles.append({"layer": layer, "scheme": scheme, "delta_ppl": round(delta, 4),
                        **{f"cost_{m}": table.cost(layer, scheme, m) for m in table.available_metrics()}})
    report["single_layer"] = singles
    report["spearman"] = {m: round(spearman([s[f"cost_{m}"] for s in singles], [s["delta_ppl"] for s in singles]), 3)
                          for m in table.available_metrics()}
    print(json.dumps({"spearman": report["spearman"]}), flush=True)
    save()


def requantize(args, table, calibration, ids, device, report, save) -> None:
    """The ILP's allocations (best-predicting metrics) and uniform int3/int4 through the real pipeline."""
    pipelines = [(f"uniform {name}", {layer: name for layer in table.layers}) for name in args.requantize_uniform]
    best = max(report["spearman"], key=report["spearman"].get) if "spearman" in report else "output_error"
    pipelines += [(f"ILP {metric} {budget}", solve_ilp(build_problem(table, metric, budget_bits=budget)).schemes)
                  for metric in dict.fromkeys(["kfac", best]) for budget in args.budgets]
    report["requantized"] = []
    for label, schemes in pipelines:
        fresh, _ = load_model(args.model, torch.float32)
        parsed = {layer: Scheme.parse(name) for layer, name in schemes.items()}
        quantized = quantize_model(fresh, calibration, parsed.get, device, progress=False)
        bits = sum(q.storage_bits for q in quantized.values()) / sum(q.numel for q in quantized.values())
        value = perplexity_of_ids(fresh.to(device), ids, args.seqlen, args.windows, batch_size=4,
                                  dataset="wikitext2").ppl
        report["requantized"].append({"label": label, "bits_per_weight": round(bits, 4), "ppl": round(value, 3)})
        print(json.dumps(report["requantized"][-1]), flush=True)
        del fresh
        save()


if __name__ == "__main__":
    main()

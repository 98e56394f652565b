"""Where the exact solver earns its place: the ILP against greedy on a real sensitivity table under the
constraints serving engines impose (a latency budget from a measured kernel table, one format family per
decoder block, one scheme per fused group), across a grid of bit and latency budgets.

    python bench/greedy_gap.py --table docs/data/round0-smollm2-h200-seed0 --latency docs/data/latency-h200.json
    python bench/greedy_gap.py --table <a table with several families> --family-per-block \
        --measure .assets/models/smollm2-135m-dithered --ids .gpu/ids-small --seed 0

With --measure, both allocations of every problem are quantized through the pipeline (calibration
`calibration_seed{k}` from --ids, as bench/allocation_data.py writes it) and scored on WikiText-2's first
--windows windows and on held-out C4.

Only the candidates the latency table covers take part. The latency budget is set between the fastest and
the slowest allocation (`--latency-fractions`: 0 = everything on its fastest option). Prints one row per
(bits, latency) pair: both objectives, greedy's excess over the ILP, and whether each fits the budgets.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from quantbench.allocation.baselines import solve_greedy
from quantbench.allocation.ilp import solve_ilp
from quantbench.allocation.problem import DEFAULT_TIES, build_problem
from quantbench.allocation.table import SensitivityTable
from quantbench.allocation.in_context import scheme_lookup
from quantbench.errors import QuantbenchError
from quantbench.eval.perplexity import perplexity_of_ids
from quantbench.pipeline import quantize_model


def covered(table: SensitivityTable, latency: dict[str, float]) -> SensitivityTable:
    names = [c for c in table.candidates if any(re.search(pattern, c) for pattern in latency)]
    return SensitivityTable(table.layers, {k: v for k, v in table.errors.items() if k[1] in names}, names, table.meta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", required=True, help="a saved sensitivity table (folder or sensitivity.json)")
    parser.add_argument("--latency", help="a table written by bench/kernel_latency.py")
    parser.add_argument("--family-per-block", action="store_true")
    parser.add_argument("--measure", help="a model to quantize both allocations of and score")
    parser.add_argument("--ids", help="folder written by bench/allocation_data.py (with --measure)")
    parser.add_argument("--seed", type=int, default=0, help="calibration draw (with --measure)")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--metric", default="output_fisher")
    parser.add_argument("--budgets", nargs="+", type=float, default=[2.75, 3.0, 3.25, 3.5])
    parser.add_argument("--latency-fractions", nargs="+", type=float, default=[0.1, 0.25, 0.4, 0.6])
    args = parser.parse_args()
    table = SensitivityTable.load(args.table)
    latency, fastest, slowest = None, 0.0, 0.0
    if args.latency:
        latency = json.loads(open(args.latency).read())["table"]
        table = covered(table, latency)
        print(f"candidates with a measured latency: {', '.join(table.candidates)}")
        unlimited = build_problem(table, args.metric, budget_bits=99, ties=DEFAULT_TIES, latency_table=latency)
        fastest = sum(min(o.latency for o in item.options) for item in unlimited.items)
        slowest = sum(max(o.latency for o in item.options) for item in unlimited.items)
    else:
        args.latency_fractions = [None]
    score = measurer(args) if args.measure else None
    rows = []
    for bits in args.budgets:
        for fraction in args.latency_fractions:
            limit = None if fraction is None else fastest + fraction * (slowest - fastest)
            problem = build_problem(table, args.metric, budget_bits=bits, ties=DEFAULT_TIES, latency_table=latency,
                                    max_latency=limit, family_per_block=args.family_per_block)
            exact = solve_ilp(problem)
            try:
                greedy = solve_greedy(problem)
            except QuantbenchError as exc:
                greedy = None
                reason = str(exc)
            row = {"bits": bits, "latency_us": None if limit is None else round(limit, 2), "ilp": round(exact.objective, 5),
                   "ilp_bits": round(exact.bits_per_weight, 4), "ilp_status": exact.status}
            if greedy is not None:
                row.update(greedy=round(greedy.objective, 5), greedy_bits=round(greedy.bits_per_weight, 4),
                           greedy_excess=round(greedy.objective / exact.objective - 1, 4))
            else:
                row["greedy"] = reason
            if score is not None:
                row["ilp_ppl"] = score(exact.schemes)
                if greedy is not None:
                    row["greedy_ppl"] = score(greedy.schemes)
            rows.append(row)
            print(json.dumps(row), flush=True)
    excess = [r["greedy_excess"] for r in rows if "greedy_excess" in r]
    print(json.dumps({"problems": len(rows), "greedy_failed": len(rows) - len(excess),
                      "greedy_excess_max": max(excess, default=None),
                      "greedy_excess_median": sorted(excess)[len(excess) // 2] if excess else None}))


def measurer(args):
    """allocation → perplexity on WikiText-2's first windows and held-out C4, after the pipeline."""
    from quantbench.model_io import load_model

    torch.set_grad_enabled(False)
    ids = Path(args.ids)
    calibration = load_file(str(ids / f"calibration_seed{args.seed}.safetensors"))["input_ids"]
    span = args.windows * args.seqlen
    sets = {"wikitext2_first": load_file(str(ids / "wikitext2.safetensors"))["input_ids"][:span],
            "c4_heldout": load_file(str(ids / "c4_heldout.safetensors"))["input_ids"][:span]}
    pristine, _ = load_model(args.measure, torch.float32)
    print(json.dumps({"full_precision": {name: round(perplexity_of_ids(pristine, tokens, args.seqlen,
                                                                        batch_size=4).ppl, 3)
                                         for name, tokens in sets.items()}}), flush=True)

    def score(schemes: dict[str, str]) -> dict[str, float]:
        model = copy.deepcopy(pristine)
        quantize_model(model, calibration, scheme_lookup(schemes), torch.device("cpu"), progress=False)
        return {name: round(perplexity_of_ids(model, tokens, args.seqlen, batch_size=4).ppl, 3)
                for name, tokens in sets.items()}

    return score


if __name__ == "__main__":
    main()

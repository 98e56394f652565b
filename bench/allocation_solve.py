"""ILP solve time on a saved sensitivity table (tied and untied, all candidates and the first 8) and on a
synthetic 1000 × 12 instance; CBC, budget 3.0 bits per weight unless --budget.

    python bench/allocation_solve.py --table runs/bench-allocation/sensitivity.json
"""

from __future__ import annotations

import argparse
import json

from allocation import synthetic_problem

from quantbench.allocation.ilp import solve_ilp
from quantbench.allocation.problem import DEFAULT_TIES, build_problem
from quantbench.allocation.table import SensitivityTable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", required=True, help="sensitivity.json (or its folder)")
    parser.add_argument("--budget", type=float, default=3.0)
    parser.add_argument("--metric", default="kfac")
    args = parser.parse_args()
    table = SensitivityTable.load(args.table)
    rows = {}
    for ties, label in ((DEFAULT_TIES, "tied"), ((), "untied")):
        for names in (table.candidates, table.candidates[:8]):
            sub = SensitivityTable(table.layers, {k: v for k, v in table.errors.items() if k[1] in names}, list(names))
            problem = build_problem(sub, args.metric, budget_bits=args.budget, ties=ties)
            result = solve_ilp(problem)
            rows[f"{label}: {len(problem.items)} items × {len(names)}"] = (round(result.seconds, 3), result.status)
    result = solve_ilp(synthetic_problem(1000, 12), time_limit=60)
    rows["synthetic: 1000 items × 12"] = (round(result.seconds, 3), result.status)
    print(json.dumps(rows, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()

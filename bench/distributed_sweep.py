"""A Pareto sweep with evaluation on 1, 2, 4 … ranks, each rank count launched through `quantbench run --nproc`
in this run: wall time, its speed-up over one rank, and the evaluated perplexities (which must agree).

    python bench/distributed_sweep.py recipes/ilp-sweep.yaml --evaluate 2.5 3 3.5 4 4.5 5 --ranks 1 2 4 --json out.json
    OMP_NUM_THREADS=1 python bench/distributed_sweep.py recipes/ilp-sweep.yaml --ranks 1 2 \\
        --set model.device=cpu calibration.n_samples=16 calibration.seqlen=256 eval.seqlen=512 eval.max_windows=8

The recipe's sweep evaluates the `--evaluate` budgets; each run writes to a scratch directory. The wall time
covers the whole process (start-up and model load included); `quantize_s` and `eval_s` are the run's own
stage timings (rank 0's). Sensitivity candidates, the in-context solves and every evaluated point's
perplexity windows are what the ranks share (docs/distributed.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def recipe_for(base: Path, evaluate: list[float], settings: list[str], out: Path) -> Path:
    data = yaml.safe_load(base.read_text())
    sweep = data.setdefault("allocation", {}).setdefault("sweep", {})
    sweep.setdefault("budgets", f"{min(evaluate)}:{max(evaluate)}:0.25")
    sweep["evaluate"] = evaluate
    for setting in settings:
        key, value = setting.split("=", 1)
        *path, last = key.split(".")
        node = data
        for part in path:
            node = node.setdefault(part, {})
        sexagesimal = ":" in value and value[:1] not in "{["  # YAML 1.1 reads 3:4:0.5 as a base-60 number
        node[last] = value if sexagesimal else yaml.safe_load(value)
    data.setdefault("output", {})["dir"] = str(out / "run")
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", type=Path, help="a recipe with an allocation section")
    parser.add_argument("--evaluate", type=float, nargs="+", default=[2.5, 3.0, 3.5, 4.0, 4.5, 5.0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE", help="recipe overrides")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for ranks in args.ranks:
            out = Path(scratch) / f"ranks-{ranks}"
            out.mkdir()
            recipe = recipe_for(args.recipe, args.evaluate, args.set, out)
            command = [sys.executable, "-m", "quantbench", "run", str(recipe), "--force", "--quiet", "--nproc", str(ranks)]
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, env=os.environ)
            wall = time.perf_counter() - started
            if done.returncode != 0:
                raise SystemExit(f"{ranks} rank(s) failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            result = json.loads((out / "run" / "result.json").read_text())
            timings = result["timings_s"]
            evaluated = {f"{point['budget']} {point['dataset']}": point["ppl"] for point in result["allocation"]["evaluated"]}
            runs.append({"ranks": ranks, "wall_s": wall, "quantize_s": timings.get("quantize"),
                         "eval_s": timings.get("eval_quantized"), "breakdown_s": result.get("quantize_breakdown_s"),
                         "evaluated_ppl": evaluated})
            first = runs[0]
            largest = max(abs(ppl / first["evaluated_ppl"][point] - 1) for point, ppl in evaluated.items())
            runs[-1].update(speedup=first["wall_s"] / wall, quantize_speedup=first["quantize_s"] / timings["quantize"],
                            largest_ppl_change=largest)
            print(f"{ranks} rank(s): {wall:7.1f} s wall (×{runs[-1]['speedup']:.2f}), quantize and sweep "
                  f"{timings['quantize']:7.1f} s (×{runs[-1]['quantize_speedup']:.2f}); {len(evaluated)} points, "
                  f"perplexity within {largest:.1e} of one rank's", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"recipe": str(args.recipe), "evaluate": args.evaluate, "settings": args.set,
                                         "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Does the route to GPTQ's inverse-Hessian factor change quantization quality? Each layer's GPTQ objective
tr((W − Q) H (W − Q)ᵀ) with the package's factor against the reference implementation's route, on the real
Hessians of a model's layers: the whole-model perplexity amplifies float-rounding differences chaotically,
the per-layer objective does not.

    python bench/factor_objectives.py --model .assets/models/smollm2-135m-dithered \
        --calibration-ids ids/c4-seed0.safetensors --samples 32   # the windows `gptq_reference.py draw` wrote
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from gptq_solve import invert_and_refactor
from safetensors.torch import load_file

import quantbench.quantizers.gptq as gptq
from quantbench.model_io import load_model
from quantbench.pipeline import quantize_model
from quantbench.scheme import Scheme


def recorded_hessians(model, ids: torch.Tensor, blocks: set[int],
                      device: torch.device | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight, Hessian) of every GPTQ solve in `blocks`, as true-sequential int4 GPTQ calibrates them."""
    recorded, original = [], gptq.GPTQSolver.quantize

    def recording(self, weight, scheme, stats):
        recorded.append((weight.detach().clone(), stats.hessian.clone()))
        return original(self, weight, scheme, stats)

    gptq.GPTQSolver.quantize = recording
    try:
        quantize_model(model, ids, lambda name: Scheme.parse("int4-g128-gptq")
                       if int(name.split(".")[2]) in blocks else None, device or torch.device("cpu"),
                       progress=False)
    finally:
        gptq.GPTQSolver.quantize = original
    return recorded


def objective(weight: torch.Tensor, hessian: torch.Tensor, scheme: Scheme, route) -> float:
    package_route = gptq.upper_cholesky_of_inverse_of
    gptq.upper_cholesky_of_inverse_of = route
    try:
        quantized = gptq.gptq_quantize(weight, hessian, scheme)
    finally:
        gptq.upper_cholesky_of_inverse_of = package_route
    return gptq.layer_objective(weight, quantized.dequantize(torch.float32), hessian)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=".assets/models/smollm2-135m-dithered")
    parser.add_argument("--calibration-ids", required=True, help="safetensors with input_ids [n, seqlen]")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 2, 10, 20, 29])
    parser.add_argument("--schemes", nargs="+", default=["int4-g128-gptq", "int3-g128-gptq"])
    parser.add_argument("--json")
    args = parser.parse_args()
    model, _ = load_model(args.model, torch.float32)
    ids = load_file(args.calibration_ids)["input_ids"][: args.samples]
    solves = recorded_hessians(model, ids, set(args.blocks))

    def reference_route(hessian):
        return invert_and_refactor(hessian), torch.zeros(hessian.shape[:-2], dtype=torch.int32)

    rows = []
    for name in args.schemes:
        scheme = Scheme.parse(name)
        ratios = [objective(w, h, scheme, gptq.upper_cholesky_of_inverse_of) / objective(w, h, scheme, reference_route)
                  - 1 for w, h in solves]
        rows.append({"scheme": name, "solves": len(ratios), "mean_pct": 100 * statistics.mean(ratios),
                     "median_pct": 100 * statistics.median(ratios), "min_pct": 100 * min(ratios),
                     "max_pct": 100 * max(ratios), "worse": sum(r > 0 for r in ratios),
                     "equal": sum(r == 0 for r in ratios)})
        print(json.dumps(rows[-1]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

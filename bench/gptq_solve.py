"""The GPTQ solve alone, eager vs CUDA graphs vs the fused Triton kernel, on the layer shapes of Llama-3-8B.

    python bench/gptq_solve.py

For each shape and scheme: median time of each solve (CUDA events, after a first call that compiles or
captures), and how many codes the graphed and fused solves share with the eager one. Random weights and a random
positive-definite Hessian; the time does not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from quantbench.quantizers.gptq import gptq_quantize
from timing import timed
from quantbench.scheme import Scheme

SHAPES = {"qkv (stacked)": (6144, 4096), "o": (4096, 4096), "gate+up (stacked)": (28672, 4096), "down": (4096, 14336)}
SCHEMES = ["int4-g128-gptq", "int4-g128-gptq-act", "int4-g128-gptq-act-static", "int3-g128-gptq", "mxfp4-gptq",
           "nvfp4-gptq-act-static"]
MODES = {"eager": {"QUANTBENCH_CUDA_GRAPHS": "0", "QUANTBENCH_GPTQ_KERNEL": "0"},
         "graph": {"QUANTBENCH_CUDA_GRAPHS": "1", "QUANTBENCH_GPTQ_KERNEL": "0"},
         "fused": {"QUANTBENCH_CUDA_GRAPHS": "1", "QUANTBENCH_GPTQ_KERNEL": "1"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--schemes", nargs="+", default=SCHEMES)
    parser.add_argument("--layers", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    device = torch.device("cuda")
    rows_out = []
    for label in args.layers:
        rows, cols = SHAPES[label]
        g = torch.Generator(device=device).manual_seed(0)
        W = torch.randn(rows, cols, device=device, generator=g)
        X = torch.randn(2 * cols, cols, device=device, generator=g) * (torch.rand(cols, device=device, generator=g) + 0.1)
        H = 2 * X.T @ X / X.shape[0]
        del X
        for name in args.schemes:
            scheme = Scheme.parse(name)
            row = {"layer": label, "shape": [rows, cols], "scheme": name}
            results = {}
            for mode, env in MODES.items():
                os.environ.update(env)
                first_s, _ = timed(lambda: gptq_quantize(W, H, scheme), device, 1)  # compiles / captures
                seconds, results[mode] = timed(lambda: gptq_quantize(W, H, scheme), device,
                                               1 if mode == "eager" else args.repeat)
                row[f"{mode}_s"], row[f"{mode}_first_call_s"] = round(seconds, 4), round(first_s, 3)
                row[f"us_per_column_{mode}"] = round(1e6 * seconds / cols, 2)
            for mode in ("graph", "fused"):
                row[f"codes_equal_{mode}"] = (results["eager"].codes == results[mode].codes).float().mean().item()
                row[f"scales_equal_{mode}"] = bool(torch.equal(results["eager"].scales, results[mode].scales))
            row["fused_vs_graph"] = round(row["graph_s"] / row["fused_s"], 2)
            rows_out.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("| layer | shape | scheme | eager s | graph s | fused s | fused vs graph | µs/column (fused) | codes = eager |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows_out:
        print(f"| {r['layer']} | {r['shape'][0]}×{r['shape'][1]} | {r['scheme']} | {r['eager_s']:.3f} | "
              f"{r['graph_s']:.3f} | {r['fused_s']:.3f} | {r['fused_vs_graph']:.1f}× | {r['us_per_column_fused']} | "
              f"{r['codes_equal_fused']:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows_out, indent=2))


if __name__ == "__main__":
    main()

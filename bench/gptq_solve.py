"""The GPTQ solve alone, eager vs CUDA graphs, on the layer shapes of a 1B-class Llama.

    python bench/gptq_solve.py --device cuda

For each shape and scheme: median time of the eager solve and of the graphed one (CUDA events, after a
first graphed call that also captures), and how many codes the two agree on. Random weights and a random
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

SHAPES = {"qkv (stacked)": (3072, 2048), "o": (2048, 2048), "gate+up (stacked)": (16384, 2048), "down": (2048, 8192)}
SCHEMES = ["int4-g128-gptq", "int4-g128-gptq-act", "int4-pc-gptq", "int4-g128-gptq-act-static"]


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
        X = torch.randn(4 * cols, cols, device=device, generator=g) * (torch.rand(cols, device=device, generator=g) + 0.1)
        H = 2 * X.T @ X / X.shape[0]
        for name in args.schemes:
            scheme = Scheme.parse(name)
            os.environ["QUANTBENCH_CUDA_GRAPHS"] = "0"
            eager_s, eager = timed(lambda: gptq_quantize(W, H, scheme), device, args.repeat)
            os.environ["QUANTBENCH_CUDA_GRAPHS"] = "1"
            first_s, _ = timed(lambda: gptq_quantize(W, H, scheme), device, 1)
            graph_s, graphed = timed(lambda: gptq_quantize(W, H, scheme), device, args.repeat)
            row = {"layer": label, "shape": [rows, cols], "scheme": name, "eager_s": round(eager_s, 3),
                   "graph_first_call_s": round(first_s, 3), "graph_s": round(graph_s, 3),
                   "speedup": round(eager_s / graph_s, 2), "us_per_column_eager": round(1e6 * eager_s / cols, 1),
                   "us_per_column_graph": round(1e6 * graph_s / cols, 1),
                   "codes_equal": (eager.codes == graphed.codes).float().mean().item(),
                   "scales_equal": bool(torch.equal(eager.scales, graphed.scales))}
            rows_out.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("| layer | shape | scheme | eager s | graph s | speed-up | µs/column (graph) | codes equal |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows_out:
        print(f"| {r['layer']} | {r['shape'][0]}×{r['shape'][1]} | {r['scheme']} | {r['eager_s']:.3f} | "
              f"{r['graph_s']:.3f} | {r['speedup']:.2f}× | {r['us_per_column_graph']} | {r['codes_equal']:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows_out, indent=2))


if __name__ == "__main__":
    main()

"""The GPTQ solve alone, eager vs CUDA graphs vs the fused Triton kernel, on the layer shapes of Llama-3-8B; on
the CPU, the torch loop vs the C++ library's column loop (`quantizers/gptq_cpu.py`).

    python bench/gptq_solve.py
    python bench/gptq_solve.py --factors      # the inverse-Hessian factor alone: three routes, 8B widths
    python bench/gptq_solve.py --device cpu --model 135m --schemes int3-g128-gptq-act int4-g128-gptq int8-pc-gptq

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

from quantbench.quantizers.gptq import gptq_quantize, upper_cholesky_of_inverse_of
from timing import timed
from quantbench.scheme import Scheme

SHAPES = {"8b": {"qkv (stacked)": (6144, 4096), "o": (4096, 4096), "gate+up (stacked)": (28672, 4096),
                  "down": (4096, 14336)},
          "135m": {"qkv (stacked)": (960, 576), "o": (576, 576), "gate+up (stacked)": (3072, 576), "down": (576, 1536)}}
SCHEMES = ["int4-g128-gptq", "int4-g128-gptq-act", "int4-g128-gptq-act-static", "int3-g128-gptq", "mxfp4-gptq",
           "nvfp4-gptq-act-static"]
MODES = {"eager": {"QUANTBENCH_CUDA_GRAPHS": "0", "QUANTBENCH_GPTQ_KERNEL": "0"},
         "graph": {"QUANTBENCH_CUDA_GRAPHS": "1", "QUANTBENCH_GPTQ_KERNEL": "0"},
         "fused": {"QUANTBENCH_CUDA_GRAPHS": "1", "QUANTBENCH_GPTQ_KERNEL": "1"}}
CPU_MODES = {"eager": {"QUANTBENCH_GPTQ_KERNEL": "0"}, "library": {"QUANTBENCH_GPTQ_KERNEL": "1"}}


def invert_and_refactor(H: torch.Tensor) -> torch.Tensor:
    """The reference implementation's route: factorise H, invert it from its factor, factorise the inverse."""
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)


def reversed_solve(H: torch.Tensor) -> torch.Tensor:
    """The package's route with the triangular inverse as one solve against the identity (n³ FLOP)."""
    lower = torch.linalg.cholesky(H.flip(-2, -1))
    eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
    return torch.linalg.solve_triangular(lower, eye, upper=False).flip(-2, -1)


ROUTES = {"invert_and_refactor": invert_and_refactor, "reversed_solve": reversed_solve,
          "reversed_halves": lambda H: upper_cholesky_of_inverse_of(H)[0]}  # the package's


def factors(device: torch.device, repeat: int) -> list[dict]:
    """Seconds and float64 error of the routes to GPTQ's factor, at the widths of Llama-3-8B's inputs."""
    rows = []
    for width in (4096, 14336):
        g = torch.Generator(device=device).manual_seed(0)
        X = torch.randn(2 * width, width, device=device, generator=g) * (torch.rand(width, device=device, generator=g)
                                                                         + 0.1)
        H = 2 * X.T @ X / X.shape[0]
        del X
        H.diagonal().add_(0.01 * H.diagonal().mean())
        reference = torch.linalg.cholesky(torch.linalg.inv(H.double()), upper=True)
        row = {"width": width}
        for name, route in ROUTES.items():
            seconds, upper = timed(lambda route=route: route(H), device, repeat, warmup=True)
            row[f"{name}_s"] = round(seconds, 4)
            row[f"{name}_error"] = float((upper.double() - reference).norm() / reference.norm())
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--schemes", nargs="+", default=SCHEMES)
    parser.add_argument("--model", choices=list(SHAPES), default="8b", help="whose layer shapes")
    parser.add_argument("--layers", nargs="+", help="of the model's: qkv (stacked), o, gate+up (stacked), down")
    parser.add_argument("--factors", action="store_true", help="time the inverse-Hessian factor's routes only")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.factors:
        rows = factors(device, args.repeat)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
        return
    shapes = SHAPES[args.model]
    modes = MODES if device.type == "cuda" else CPU_MODES
    last, baseline = list(modes)[-1], "graph" if device.type == "cuda" else "eager"
    rows_out = []
    for label in args.layers or list(shapes):
        rows, cols = shapes[label]
        g = torch.Generator(device=device).manual_seed(0)
        W = torch.randn(rows, cols, device=device, generator=g)
        X = torch.randn(2 * cols, cols, device=device, generator=g) * (torch.rand(cols, device=device, generator=g) + 0.1)
        H = 2 * X.T @ X / X.shape[0]
        del X
        for name in args.schemes:
            scheme = Scheme.parse(name)
            row = {"layer": label, "shape": [rows, cols], "scheme": name}
            results = {}
            for mode, env in modes.items():
                os.environ.update(env)
                first_s, _ = timed(lambda: gptq_quantize(W, H, scheme), device, 1)  # compiles / captures
                seconds, results[mode] = timed(lambda: gptq_quantize(W, H, scheme), device,
                                               1 if mode == "eager" else args.repeat)
                row[f"{mode}_s"], row[f"{mode}_first_call_s"] = round(seconds, 4), round(first_s, 3)
                row[f"us_per_column_{mode}"] = round(1e6 * seconds / cols, 2)
            for mode in list(modes)[1:]:
                row[f"codes_equal_{mode}"] = (results["eager"].codes == results[mode].codes).float().mean().item()
                row[f"scales_equal_{mode}"] = bool(torch.equal(results["eager"].scales, results[mode].scales))
            row[f"{last}_vs_{baseline}"] = round(row[f"{baseline}_s"] / row[f"{last}_s"], 2)
            rows_out.append(row)
            print(json.dumps(row), flush=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{name}, torch {torch.__version__}\n")
    print(f"| layer | shape | scheme | {' | '.join(f'{m} s' for m in modes)} | {last} vs {baseline} | "
          f"µs/column ({last}) | codes = eager |")
    print("|---|---|---|" + "---:|" * (len(modes) + 3))
    for r in rows_out:
        seconds = " | ".join(f"{r[mode + '_s']:.3f}" for mode in modes)
        print(f"| {r['layer']} | {r['shape'][0]}×{r['shape'][1]} | {r['scheme']} | {seconds} | "
              f"{r[f'{last}_vs_{baseline}']:.1f}× | {r[f'us_per_column_{last}']} | {r[f'codes_equal_{last}']:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows_out, indent=2))


if __name__ == "__main__":
    main()

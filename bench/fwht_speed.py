"""Walsh–Hadamard transform throughput: the fast transform against multiplying by the dense matrix.

    python bench/fwht_speed.py --device cpu --rows 2048 --sizes 4096 14336
    python bench/fwht_speed.py --device cuda --rows 8192 --dtypes float32 bfloat16

For each length n and dtype, a [rows, n] activation tensor is rotated by
  fast      hadamard_transform: Sylvester factors of up to 128 as small ±1 matmuls, then the Paley factor;
  radix-2   the same transform one butterfly stage per bit (log2 n passes over the data);
  dense     x @ Hᵀ with the explicit n × n matrix (2·n² flops per row).
Times are medians of CUDA events on the GPU (perf_counter on the CPU), after a warm-up call. GB/s counts
one read and one write of the activations; "vs dense" is the dense time over the method's time, both
measured in the same run. The max error is against the float64 transform.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from timing import timed

from quantbench.model_io import resolve_device
from quantbench.quantizers.fwht import hadamard_matrix, hadamard_plan, hadamard_transform
from quantbench.results import environment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 14336])
    parser.add_argument("--rows", type=int, default=2048, help="tokens rotated per call")
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)

    rows = []
    for n in args.sizes:
        dense_matrix64 = hadamard_matrix(n).to(device)
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            x = torch.randn(args.rows, n, device=device, dtype=dtype)
            exact = x.double() @ dense_matrix64.T
            dense_matrix = dense_matrix64.to(dtype)
            methods = {"fast": lambda: hadamard_transform(x), "radix-2": lambda: hadamard_transform(x, radix=2),
                       "dense": lambda: x @ dense_matrix.T}
            seconds = {}
            for method, fn in methods.items():
                seconds[method], out = timed(fn, device, repeat=args.repeat, warmup=True)
                error = (out.double() - exact).abs().max().item()
                moved = 2 * x.numel() * x.element_size()
                rows.append({"n": n, "kind": hadamard_plan(n).kind, "dtype": dtype_name, "rows": args.rows,
                             "method": method, "us": round(seconds[method] * 1e6, 1),
                             "gb_per_s": round(moved / seconds[method] / 1e9, 1), "max_error": error})
            for row in rows[-len(methods):]:
                row["vs_dense"] = round(seconds["dense"] / (row["us"] / 1e6), 2)
                print(json.dumps(row), flush=True)

    env = environment(device)
    print(f"\n{env['device_name']} ({device}), torch {torch.__version__}, {args.rows} rows per call, "
          f"median of {args.repeat}\n")
    print("| n | construction | dtype | method | µs | GB/s | vs dense | max error |\n|---:|---|---|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['n']} | {row['kind']} | {row['dtype']} | {row['method']} | {row['us']:.1f} | "
              f"{row['gb_per_s']:.1f} | {row['vs_dense']:.2f}× | {row['max_error']:.1e} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

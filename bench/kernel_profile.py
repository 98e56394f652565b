"""One call of each chosen kernel for a hardware-counter profiler: every (variant, batch) is tuned first,
then called once (and fp16 `torch.matmul` beside it) between cudaProfilerStart and Stop, so that a profiler
started with `--profile-from-start off` sees only those calls.

    ncu --clock-control none --profile-from-start off --section SpeedOfLight … \
        python bench/kernel_profile.py [--shape 8192x8192] [--batches 1 32 64] [--variants …]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernel_speed import kernel_weight  # noqa: E402

from quantbench.export.kernels.matmul import chosen_tile, graph_time_ms, packed_matmul  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8192x8192", help="KxN (inputs×outputs)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16, 32, 64])
    parser.add_argument("--variants", nargs="+", default=["int4-g128 act_order", "ternary2", "mxfp4"])
    args = parser.parse_args()
    k, n = (int(v) for v in args.shape.split("x"))
    device = torch.device("cuda")
    dense = torch.randn(n, k, device=device, dtype=torch.float16) * 0.02
    calls = []
    for label in args.variants:
        weight = kernel_weight(label, n, k, device)
        for batch in args.batches:
            x = torch.randn(batch, k, device=device, dtype=torch.float16)
            tile = chosen_tile(x, weight)
            us = 1e3 * graph_time_ms(lambda: packed_matmul(x, weight), calls=10, rounds=3)
            print(f"{label} batch {batch}: {us:.1f} µs, {tile}", flush=True)
            calls.append(lambda x=x, weight=weight: packed_matmul(x, weight))
    for batch in args.batches:
        x = torch.randn(batch, k, device=device, dtype=torch.float16)
        us = 1e3 * graph_time_ms(lambda: torch.matmul(x, dense.t()), calls=10, rounds=3)
        print(f"fp16 batch {batch}: {us:.1f} µs", flush=True)
        calls.append(lambda x=x: torch.matmul(x, dense.t()))
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for call in calls:
        call()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()

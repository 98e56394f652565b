"""Every tile configuration the tuner tries, timed on one shape and batch (to prune the candidate list).

    python bench/kernel_tiles.py --shape 8192x8192 --batch 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_speed import VARIANTS, random_weight  # noqa: E402

from quantbench.export.kernels import packed_matmul, to_kernel_layout  # noqa: E402
from quantbench.export.kernels.matmul import _candidates, graph_time_ms  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8192x8192", help="KxN (inputs×outputs)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--top", type=int, default=5)
    args = parser.parse_args()
    k, n = map(int, args.shape.split("x"))
    x = torch.randn(args.batch, k, device="cuda", dtype=torch.float16)
    dense = torch.randn(n, k, device="cuda", dtype=torch.float16)
    print(f"fp16 {1e3 * graph_time_ms(lambda: torch.matmul(x, dense.t())):.1f} µs")
    for label, name in VARIANTS.items():
        weight = to_kernel_layout(random_weight(name, n, k, "cuda"))
        timings = []
        for config in _candidates(args.batch):
            try:
                timings.append((1e3 * graph_time_ms(lambda: packed_matmul(x, weight, config=config)), config))
            except Exception as exc:  # noqa: BLE001 - report and go on
                print(f"{label} {config}: {type(exc).__name__}")
        timings.sort(key=lambda t: t[0])
        for us, config in timings[: args.top]:
            print(f"{label:>20} {us:7.1f} µs {config}")


if __name__ == "__main__":
    main()

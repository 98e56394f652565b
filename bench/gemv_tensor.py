"""The CUDA decode kernel's tensor-core tiles against its CUDA-core tiles and the tensor-core kernel, in one run:
for each shape, int variant and batch, the fastest tile of each (the tuner's candidates, checked against the
torch fallback), timed again alternately, beside fp16 `torch.matmul` and torch's int4 tinygemm
(bench/kernel_speed.py's timer: CUDA graphs, cold L2, x cached).

    python bench/gemv_tensor.py [--shapes 4096x14336 …] [--variants "int4-g128 act_order" int4-g128]
                                [--batches 1 2 4 8 16] [--json F]

Cells: µs, × fp16, and the bytes the call must move as % of the measured device-to-device copy rate.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernel_speed import (SHAPES, Timer, kernel_bytes, kernel_weight, measured_copy_bandwidth,  # noqa: E402
                          tinygemm_int4)

from quantbench.export.kernels import matmul  # noqa: E402
from quantbench.export.kernels.matmul import packed_matmul  # noqa: E402


def fastest_of_each(x: torch.Tensor, weight) -> dict[str, matmul.TileConfig]:
    """The tuner's choice among the CUDA decode kernel's CUDA-core tiles, among its tensor-core tiles and among
    the tensor-core kernel's (packed_mma.cu) tiles, where each applies."""
    candidates = matmul._cuda_candidates(x, weight)
    kinds = {"cuda cores": [c for c in candidates if not c.tensor], "tensor cores": [c for c in candidates if c.tensor],
             "mma kernel": matmul._mma_candidates(x, weight)}
    return {kind: matmul._fastest(x, weight, tiles) for kind, tiles in kinds.items() if tiles}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=[f"{k}x{n}" for k, n in SHAPES], help="KxN (inputs×outputs)")
    parser.add_argument("--variants", nargs="+", default=["int4-g128 act_order", "int4-g128"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    parser.add_argument("--repeat", type=int, default=10, help="calls per CUDA graph")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda")
    copy_rate = measured_copy_bandwidth(device)
    print(f"{time.strftime('%Y-%m-%d')} {torch.cuda.get_device_name(device)}, copy rate {copy_rate / 1e12:.2f} TB/s",
          flush=True)
    timer = Timer(args.repeat)
    rows = []
    for shape in args.shapes:
        k, n = map(int, shape.split("x"))
        dense = torch.randn(n, k, device=device, dtype=torch.float16) * 0.02
        tinygemm = tinygemm_int4(n, k, device)
        for label in args.variants:
            weight = kernel_weight(label, n, k, device)
            for batch in args.batches:
                x = torch.randn(batch, k, device=device, dtype=torch.float16)
                tiles = fastest_of_each(x, weight)
                calls = {kind: (lambda tile=tile: packed_matmul(x, weight, tile.engine, tile))
                         for kind, tile in tiles.items()}
                calls["fp16"] = lambda: torch.matmul(x, dense.t())
                times = {name: [] for name in calls}
                for _ in range(2):  # alternately, twice
                    for name, call in calls.items():
                        times[name].append(timer(call, x))
                row = {"shape": shape, "variant": label, "batch": batch}
                fp16 = min(times["fp16"])
                nbytes = kernel_bytes(weight, batch, k, n)
                for name, us in times.items():
                    moved = 2 * n * k if name == "fp16" else nbytes
                    row[name] = {"us": us, "speedup": fp16 / min(us),
                                 "pct_copy": 100 * moved / (min(us) * 1e-6) / copy_rate}
                    if name in tiles:
                        row[name]["tile"] = {f: v for f, v in vars(tiles[name]).items()}
                if tinygemm is not None:
                    x_bf16 = x.to(torch.bfloat16)
                    us = timer(lambda: tinygemm(x_bf16), x_bf16)
                    row["tinygemm"] = {"us": [us], "speedup": fp16 / us}
                rows.append(row)
                cells = "  ".join(f"{name} {min(v['us']):6.1f} µs ×{v['speedup']:.2f}"
                                  + (f" {v['pct_copy']:.0f}%" if "pct_copy" in v else "")
                                  for name, v in row.items() if isinstance(v, dict) and "us" in v)
                print(f"{shape:>11} {label:>20} b{batch}: {cells}", flush=True)
                for name in tiles:
                    t = row[name]["tile"]
                    print(f"{'':>36} {name}: rows {t['rows']}, lanes {t['block_n'] // 4}, threads "
                          f"{32 * t['num_warps']}, splits {t['split_k']}, column blocks {t['column_blocks']}, "
                          f"stages {t['num_stages']}, streamed {t['streamed']}, x shared {t['x_in_shared']}; "
                          f"times {', '.join(f'{u:.1f}' for u in row[name]['us'])}", flush=True)
                if args.json:
                    args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

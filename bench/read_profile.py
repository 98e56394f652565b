"""One launch each of the batch-1 decode kernel (int4-g128 with and without act_order, whole and loads alone)
and of read_ceiling.py's tile reads at 132, 264 and 1,056 programs, at 4096×14336, between
cudaProfilerStart/Stop, for Nsight Compute:

    ncu --profile-from-start off --clock-control none --cache-control all --section SpeedOfLight \\
        --section Occupancy --section LaunchStats --section WarpStateStats python bench/read_profile.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))

from kernel_speed import kernel_weight  # noqa: E402
from read_ceiling import triton_read_tiles  # noqa: E402

from quantbench.export.kernels import cuda_gemv  # noqa: E402


def main() -> None:
    k, n = 4096, 14336
    act_order = kernel_weight("int4-g128 act_order", n, k, "cuda")
    plain = kernel_weight("int4-g128", n, k, "cuda")
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    launches = {
        "int4 act_order, 32 lanes, 256 threads": lambda: cuda_gemv.launch(x, act_order, 1, 32, 256),
        "the same, loads alone": lambda: cuda_gemv.launch(x, act_order, 1, 32, 256, load_only=True),
        "loads alone, 512 threads": lambda: cuda_gemv.launch(x, act_order, 1, 32, 512, load_only=True),
        "int4 without act_order, 32 lanes, 256 threads": lambda: cuda_gemv.launch(x, plain, 1, 32, 256),
        "without act_order, 8 lanes, 256 threads, 2 splits": lambda: cuda_gemv.launch(x, plain, 1, 8, 256, splits=2),
        **{f"tile read, {p} programs": triton_read_tiles(act_order.qweight, p, 32, 64, 8, True)
           for p in (132, 264, 1056)},
    }
    for launch in launches.values():  # built, compiled and warmed outside the profile
        launch()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for name, launch in launches.items():
        print("launch:", name, flush=True)
        launch()
        torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()

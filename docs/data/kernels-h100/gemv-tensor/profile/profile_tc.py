"""One call each of the fastest CUDA-core tile and the fastest tensor-core tile (3582080's code) of int4-g128 at
batch 1, between cudaProfilerStart and Stop, for ncu --profile-from-start off."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, "bench")
from kernel_speed import kernel_weight  # noqa: E402

from quantbench.export.kernels import matmul  # noqa: E402
from quantbench.export.kernels.matmul import graph_time_ms, packed_matmul  # noqa: E402

device = torch.device("cuda")
for shape in sys.argv[1:]:
    k, n = map(int, shape.split("x"))
    weight = kernel_weight("int4-g128", n, k, device)
    x = torch.randn(1, k, device=device, dtype=torch.float16)
    candidates = matmul._cuda_candidates(x, weight)
    tiles = {"cuda cores": matmul._fastest(x, weight, [c for c in candidates if not c.tensor]),
             "tensor cores": matmul._fastest(x, weight, [c for c in candidates if c.tensor])}
    for kind, tile in tiles.items():
        us = 1e3 * graph_time_ms(lambda: packed_matmul(x, weight, "cuda", tile), rounds=3)
        print(f"{shape} {kind}: {us:.1f} us, {tile}", flush=True)
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    for kind, tile in tiles.items():
        flush.zero_()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        packed_matmul(x, weight, "cuda", tile)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()

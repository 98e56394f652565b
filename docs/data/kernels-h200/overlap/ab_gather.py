# The tensor-core kernel started while its act_order gather runs, or after it: the fastest tile each way, both ways
# twice in one process, µs. ab.log came from the same comparison made through a temporary switch in
# cuda_mma.launch before the choice became the tile option `overlap_gather`; this is it with the option.
import sys

import torch

sys.path.insert(0, "."); sys.path.append("bench")
from kernel_speed import SHAPES, kernel_weight
from quantbench.export.kernels.matmul import _mma_candidates, graph_time_ms, packed_matmul

for k, n in SHAPES:
    w = kernel_weight("int4-g128 act_order", n, k, "cuda")
    for m in (4, 8, 16, 32):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        times = {True: [], False: []}
        for overlap in (True, False, True, False):
            tiles = [c for c in _mma_candidates(x, w) if c.overlap_gather == overlap]
            times[overlap].append(min(1e3 * graph_time_ms(lambda: packed_matmul(x, w, "mma", c)) for c in tiles))
        print(f"{k}x{n} b{m}: dependent {times[True]} plain {times[False]}", flush=True)

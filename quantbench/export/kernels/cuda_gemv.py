"""Launching the CUDA decode kernel (`packed_gemv.cu`, CUDA cores) for 1–16 rows of float16 x, through
ctypes on the current CUDA stream, so CUDA graphs capture it like any other kernel (built by
cuda_build.py)."""

from __future__ import annotations

import torch

from quantbench.export.kernels import cuda_build
from quantbench.export.kernels.cuda_build import WeightType, pointer, row_shift
from quantbench.export.kernels.layout import KernelWeight, with_inputs_gathered

ROWS = (1, 2, 4, 8)  # rows of x per program
LANES = (4, 8, 16)  # threads along the outputs (4 outputs each)
THREADS = (128, 256, 512)  # 512 with one row of x only
ASYNC_ROWS = (1, 2)  # the cp.async variant is built for these rows per block
GATHER_BYTES = 96 << 10  # act_order: shared memory for the block's rows of x, gathered (else torch gathers)
MAX_ROWS = 16  # beyond this only the tensor-core and tl.dot kernels are tried


def unsupported_reason(x: torch.Tensor, weight: KernelWeight) -> str | None:
    """Why the CUDA decode kernel does not take this call (None when it does)."""
    if x.shape[0] > MAX_ROWS:
        return f"{x.shape[0]} rows of x: the CUDA decode kernel takes up to {MAX_ROWS}"
    return cuda_build.unsupported_reason(x, weight)


def launch(x: torch.Tensor, weight: KernelWeight, rows: int, lanes: int, threads: int, async_copies: bool = False,
           load_only: bool = False) -> torch.Tensor:
    """x [M ≤ 16, K] float16, contiguous, in the original input order → [M, N] float16. `async_copies`: the
    weights through cp.async stages in shared memory (1–2 rows) instead of registers; `load_only`: the
    weight loads alone, for timing, its result meaningless."""
    reason = unsupported_reason(x, weight)
    if reason is not None:
        raise ValueError(f"the CUDA decode kernel does not run this call: {reason}")
    if (rows not in ROWS or lanes not in LANES or threads not in THREADS or (threads == 512 and rows > 1)
            or (async_copies and rows not in ASYNC_ROWS)):
        raise ValueError(f"rows {rows}, lanes {lanes}, threads {threads}, async {async_copies}: not among {ROWS}, "
                         f"{LANES}, {THREADS} (512 threads take one row; async copies {ASYNC_ROWS} rows)")
    if rows * x.shape[1] * 2 > GATHER_BYTES:  # too many inputs to gather act_order in the kernel
        x, weight = with_inputs_gathered(x, weight)
    if x.data_ptr() % 16:
        x = x.clone()
    m, k = x.shape
    n = weight.shape[0]
    function = cuda_build.entry_point(WeightType.of(weight, weight.perm is not None, load_only),
                                      cuda_build.device_arch(x.device))
    out = torch.empty(m, n, dtype=torch.float16, device=x.device)
    with torch.cuda.device(x.device):
        error = function(rows, lanes, threads, int(async_copies), x.data_ptr(), pointer(weight.perm),
                         weight.qweight.data_ptr(), weight.scales.data_ptr(), pointer(weight.zeros), out.data_ptr(),
                         m, n, k, weight.n_groups, row_shift(weight), x.stride(0), 1.0 / weight.global_scale,
                         torch.cuda.current_stream(x.device).cuda_stream)
    if error:
        raise RuntimeError(f"the CUDA decode kernel did not launch: cudaError {error}")
    return out

"""Launching the tensor-core kernel (`packed_mma.cu`: mma.sync on weights decoded in registers) for 1–64
rows of float16 x, through ctypes on the current CUDA stream (built by cuda_build.py). act_order is gathered
once per call, before the kernel."""

from __future__ import annotations

import torch

from quantbench.export.kernels import cuda_build
from quantbench.export.kernels.cuda_build import WeightType, pointer, row_shift
from quantbench.export.kernels.layout import KernelWeight, with_inputs_gathered

ROWS = (8, 16, 32)  # rows of x per block: 8 leave the upper half of each 16-row product idle
WARPS = (4, 8)
WARPS_N = (1, 2, 4)  # warps side by side along the outputs (32 each); the others split the inputs
MAX_ROWS = 64  # beyond this only the tl.dot kernel is tried


def unsupported_reason(x: torch.Tensor, weight: KernelWeight) -> str | None:
    """Why the tensor-core kernel does not take this call (None when it does)."""
    if x.shape[0] > MAX_ROWS:
        return f"{x.shape[0]} rows of x: the tensor-core kernel takes up to {MAX_ROWS}"
    return cuda_build.unsupported_reason(x, weight)


def rows_for(m: int) -> int:
    """The fewest rows per block that hold m rows of x, at most 32 (more go to more blocks)."""
    return next((rows for rows in ROWS if m <= rows), ROWS[-1])


def launch(x: torch.Tensor, weight: KernelWeight, rows: int, warps: int, warps_n: int) -> torch.Tensor:
    """x [M ≤ 64, K] float16, contiguous, in the original input order → [M, N] float16."""
    reason = unsupported_reason(x, weight)
    if reason is not None:
        raise ValueError(f"the tensor-core kernel does not run this call: {reason}")
    if rows not in ROWS or warps not in WARPS or warps_n not in WARPS_N or warps_n > warps:
        raise ValueError(f"rows {rows}, warps {warps}, warps_n {warps_n}: not among {ROWS}, {WARPS}, "
                         f"{WARPS_N} (warps_n ≤ warps)")
    x, weight = with_inputs_gathered(x, weight)
    if x.data_ptr() % 16 or not x.is_contiguous():
        x = x.contiguous().clone()
    m, k = x.shape
    n = weight.shape[0]
    function = cuda_build.entry_point(WeightType.for_mma(weight), cuda_build.device_arch(x.device))
    out = torch.empty(m, n, dtype=torch.float16, device=x.device)
    with torch.cuda.device(x.device):
        error = function(rows, warps, warps_n, x.data_ptr(), weight.qweight.data_ptr(), weight.scales.data_ptr(),
                         pointer(weight.zeros), out.data_ptr(), m, n, k, weight.n_groups, row_shift(weight),
                         x.stride(0), 1.0 / weight.global_scale, torch.cuda.current_stream(x.device).cuda_stream)
    if error:
        raise RuntimeError(f"the tensor-core kernel did not launch: cudaError {error}")
    return out

"""GPTQ's column loop on the CPU for integer grids, in quantbench's C++ library (`gptq_int_columns` in
`export/kernels/packed_cpu.cpp`).

The eager loop of `gptq._solve_columns` launches about ten torch operations a column, each on a [rows, 1] slice
or a [rows, ≤ 128] update: on the CPU it is bound by their dispatch (about 170 µs a column on one core, most of
a 135M model's GPTQ solve). The library runs the columns between two grid fits a row at a time, with the eager
loop's arithmetic operation for operation (IEEE division, round half to even, no fused multiply-add), so its codes
and errors are the eager ones bit for bit. Grids are still fitted by the format, in Python, where groups start.
"""

from __future__ import annotations

import os

import torch

from quantbench.formats import GridParams, IntFormat


def applies(fmt, weight: torch.Tensor) -> bool:
    """Integer grids on the CPU in float32, unless QUANTBENCH_GPTQ_KERNEL=0 or the library cannot be built."""
    if not (isinstance(fmt, IntFormat) and weight.device.type == "cpu" and weight.dtype == torch.float32
            and os.environ.get("QUANTBENCH_GPTQ_KERNEL", "1") != "0"):
        return False
    from quantbench.export.kernels import cpu_packed

    return cpu_packed.available()


def solve_columns(fmt: IntFormat, block, params: GridParams | None, begin: int, end: int) -> GridParams:
    """Columns [begin, end) of a lazy block (`gptq._Block`) in place, on `params` ([rows, 1]: fitted for the run)
    or, where the block holds a grid per column, on those. Returns the grid of the last column."""
    if block.col_scale is not None:
        scale = block.col_scale[:, begin:end].contiguous()
        zero = block.col_zero[:, begin:end].contiguous()
    else:
        scale, zero = params.scale.contiguous(), params.zero.contiguous()
    torch.ops.quantbench_cpu.gptq_int_columns(block.W1, block.Hinv1.contiguous(), block.codes, block.errors,
                                               scale.float(), zero.float(), begin, end,
                                               1 if fmt.symmetric else 0, fmt.max_code)
    return GridParams(scale=scale[:, -1:], zero=zero[:, -1:])

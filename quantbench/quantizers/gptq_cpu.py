"""GPTQ's column loop on the CPU for integer grids and for block formats of float elements (MXFP4/6/8, NVFP4), in
quantbench's C++ library (`gptq_int_columns` and `gptq_element_columns` in `export/kernels/packed_cpu.cpp`).

The eager loop of `gptq._solve_columns` launches about ten torch operations a column, each on a [rows, 1] slice
or a [rows, ≤ 128] update: on the CPU it is bound by their dispatch (about 170 µs a column on one core, most of
a 135M model's GPTQ solve). The library runs the columns between two grid fits a row at a time, with the eager
loop's arithmetic operation for operation (IEEE division, round half to even, no fused multiply-add; an element's
code from the bits of its float32 value, as `FloatElement._encode`), so its codes and errors are the eager ones bit
for bit. Grids and block scales are still fitted by the format, in Python, where groups start. MXINT8's elements
keep the eager loop.
"""

from __future__ import annotations

import os

import torch

from quantbench.formats import GridParams, IntFormat
from quantbench.formats.fp import FloatElement
from quantbench.formats.mx import MXFormat, NVFP4Format


def _float_blocks(fmt) -> bool:
    return isinstance(fmt, (MXFormat, NVFP4Format)) and isinstance(fmt.element, FloatElement)


def applies(fmt, weight: torch.Tensor) -> bool:
    """Integer grids and float-element block formats on the CPU in float32, unless QUANTBENCH_GPTQ_KERNEL=0 or
    the library cannot be built."""
    if not ((isinstance(fmt, IntFormat) or _float_blocks(fmt)) and weight.device.type == "cpu"
            and weight.dtype == torch.float32 and os.environ.get("QUANTBENCH_GPTQ_KERNEL", "1") != "0"):
        return False
    from quantbench.export.kernels import cpu_packed

    return cpu_packed.available()


def solve_columns(fmt, block, params: GridParams | None, begin: int, end: int) -> GridParams:
    """Columns [begin, end) of a lazy block (`gptq._Block`) in place, on `params` ([rows, 1]: fitted for the run)
    or, where the block holds a grid per column, on those. Returns the grid of the last column."""
    if block.col_scale is not None:
        scale = block.col_scale[:, begin:end].contiguous()
        zero = block.col_zero[:, begin:end].contiguous()
    else:
        scale, zero = params.scale.contiguous(), params.zero.contiguous()
    if _float_blocks(fmt):
        element = fmt.element
        torch.ops.quantbench_cpu.gptq_element_columns(
            block.W1, block.Hinv1.contiguous(), block.codes, block.errors, scale.float(), element.table, begin,
            end, element.mantissa_bits, element.min_exponent, element.max_value, element.bits, element.nan_code or 0)
    else:
        torch.ops.quantbench_cpu.gptq_int_columns(block.W1, block.Hinv1.contiguous(), block.codes, block.errors,
                                                   scale.float(), zero.float(), begin, end,
                                                   1 if fmt.symmetric else 0, fmt.max_code)
    return GridParams(scale=scale[:, -1:], zero=zero[:, -1:])

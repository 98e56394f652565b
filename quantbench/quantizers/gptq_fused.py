"""The GPTQ column loop of one lazy block as a single Triton kernel per tile of rows.

Each program holds a tile of rows × the block's columns in registers and, column by column, fits the grid
where a group starts, encodes and decodes the column, divides its error by the inverse Hessian's diagonal
and subtracts error × that Hessian row from the columns to its right: `_solve_columns` of `gptq.py`, with
every format's fit / encode / decode inlined (integer grids, MX float and int8 elements, NVFP4).

The arithmetic is the eager solve's, operation for operation: IEEE division (`div_rn`), no fused
multiply-add (the launch turns contraction off), round half to even, scales rounded as the formats round
them. The codes are therefore the eager codes on CUDA and under the Triton interpreter on the CPU.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

from quantbench.formats import IntFormat, MXFormat, NVFP4Format
from quantbench.formats.fp import E4M3, FloatElement

KIND_INT, KIND_FLOAT_ELEMENT, KIND_INT8_ELEMENT = 0, 1, 2
SCALE_POW2, SCALE_E4M3 = 0, 1
BLOCK_ROWS = 16


def fused_available(weight: torch.Tensor) -> bool:
    """On CUDA with Triton installed, unless QUANTBENCH_GPTQ_KERNEL=0."""
    return (weight.is_cuda and os.environ.get("QUANTBENCH_GPTQ_KERNEL", "1") != "0"
            and importlib.util.find_spec("triton") is not None)


@dataclass(frozen=True)
class _FormatConstants:
    kind: int
    scale_rule: int = SCALE_POW2  # block formats: power of two (MX) or E4M3 under a global scale (NVFP4)
    symmetric: bool = False
    max_code: int = 0
    sym_zero: int = 0
    mantissa_bits: int = 0
    min_exponent: int = 0
    max_value: float = 0.0
    code_bits: int = 0
    element_emax: int = 0


def _constants(fmt) -> _FormatConstants:
    if isinstance(fmt, IntFormat):
        return _FormatConstants(KIND_INT, symmetric=fmt.symmetric, max_code=fmt.max_code, sym_zero=fmt.sym_zero)
    element = fmt.element
    rule = SCALE_E4M3 if isinstance(fmt, NVFP4Format) else SCALE_POW2
    if not isinstance(element, FloatElement):
        return _FormatConstants(KIND_INT8_ELEMENT, scale_rule=rule, element_emax=element.max_exponent)
    return _FormatConstants(KIND_FLOAT_ELEMENT, scale_rule=rule, mantissa_bits=element.mantissa_bits,
                            min_exponent=element.min_exponent, max_value=element.max_value,
                            code_bits=element.bits, element_emax=element.max_exponent)


def solve_block_fused(fmt, block, fit_offsets: tuple[int, ...], group: int) -> None:
    """Fill `block.codes`, `block.errors` and (for grids fitted inside the block) `block.fit_scale` /
    `block.fit_zero`, as `_solve_columns` does for a block whose grids are all known or fitted inside it."""
    from quantbench.quantizers import gptq_fused_kernel as kernel

    if not isinstance(fmt, (IntFormat, MXFormat, NVFP4Format)):
        raise TypeError(f"no fused GPTQ kernel for {type(fmt).__name__}")
    rows, width = block.W1.shape
    up_front = block.col_scale is not None
    if not up_front and (not fit_offsets or fit_offsets[0] != 0 or width % group
                         or fit_offsets != tuple(range(0, width, group))):
        raise ValueError("the fused kernel needs the block's groups fitted up front or wholly inside it")
    c = _constants(fmt)
    W1 = block.W1.contiguous()
    Hinv1 = block.Hinv1.contiguous()
    col_scale = block.col_scale.contiguous() if up_front else W1
    col_zero = block.col_zero.contiguous() if up_front else W1
    global_scale = fmt.global_scale.to(W1.device, torch.float32) if isinstance(fmt, NVFP4Format) else W1
    n_fits = 0 if up_front else width // group
    fit_scale = torch.empty(rows, max(1, n_fits), device=W1.device)
    fit_zero = torch.empty_like(fit_scale)
    codes = torch.empty(rows, width, device=W1.device)
    errors = torch.empty_like(codes)
    grid = (triton_cdiv(rows, BLOCK_ROWS),)
    options = {} if os.environ.get("TRITON_INTERPRET") == "1" else {"enable_fp_fusion": False, "num_warps": 4}
    kernel.gptq_block_kernel[grid](
        W1, Hinv1, col_scale, col_zero, global_scale, codes, errors, fit_scale, fit_zero,
        rows, width, W1.stride(0), Hinv1.stride(0), col_scale.stride(0), fit_scale.stride(0),
        BLOCK_ROWS=BLOCK_ROWS, WIDTH=max(16, 1 << (width - 1).bit_length()), GROUP=group if not up_front else 1,
        UP_FRONT=up_front, KIND=c.kind, SCALE_RULE=c.scale_rule, SYMMETRIC=c.symmetric, MAX_CODE=c.max_code,
        SYM_ZERO=c.sym_zero, MANTISSA_BITS=c.mantissa_bits, MIN_EXPONENT=c.min_exponent, MAX_VALUE=c.max_value,
        CODE_BITS=c.code_bits, ELEMENT_EMAX=c.element_emax, E4M3_MANTISSA_BITS=E4M3.mantissa_bits,
        E4M3_MIN_EXPONENT=E4M3.min_exponent, E4M3_MAX_VALUE=E4M3.max_value, E4M3_CODE_BITS=E4M3.bits,
        **options)
    block.codes.copy_(codes)
    block.errors.copy_(errors)
    if n_fits:
        block.fit_scale.copy_(fit_scale)
        block.fit_zero.copy_(fit_zero)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)

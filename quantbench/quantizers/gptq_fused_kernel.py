"""Triton source of the fused GPTQ block solve (see gptq_fused.py). Imported only where Triton is installed."""

import triton
import triton.language as tl

ROUNDING_MAGIC = tl.constexpr(12582912.0)  # 1.5 · 2^23: x + M − M rounds x to an integer, half to even, for |x| < 2^22
ROUNDING_LIMIT = tl.constexpr(4194304.0)  # 2^22
FP16_TINY = tl.constexpr(5.960464477539063e-08)  # 2^-24
FP16_MAX = tl.constexpr(65504.0)


@triton.jit
def _round_half_even(x):
    x = tl.minimum(tl.maximum(x, -ROUNDING_LIMIT), ROUNDING_LIMIT)
    return (x + ROUNDING_MAGIC) - ROUNDING_MAGIC


@triton.jit
def _floor_log2(x):
    return ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127


@triton.jit
def _pow2(e):
    normal = (tl.maximum(e + 127, 1) << 23).to(tl.float32, bitcast=True)
    subnormal = (tl.full(e.shape, 1, tl.int32) << tl.minimum(tl.maximum(e + 149, 0), 22)).to(tl.float32, bitcast=True)
    return tl.where(e >= -126, normal, subnormal)


@triton.jit
def _element_encode(x, MANTISSA_BITS: tl.constexpr, MIN_EXPONENT: tl.constexpr, MAX_VALUE: tl.constexpr,
                    CODE_BITS: tl.constexpr):
    bits = x.to(tl.int32, bitcast=True)
    magnitude = tl.minimum((bits & 0x7FFFFFFF).to(tl.float32, bitcast=True), MAX_VALUE)
    exponent = tl.maximum(_floor_log2(magnitude), MIN_EXPONENT)
    inverse_step = (((MANTISSA_BITS + 127) - exponent) << 23).to(tl.float32, bitcast=True)
    steps = _round_half_even(inverse_step * magnitude)
    code = steps.to(tl.int32) + ((exponent - MIN_EXPONENT) << MANTISSA_BITS)
    return code | (((bits >> 31) & 1) << (CODE_BITS - 1))


@triton.jit
def _element_decode(code, MANTISSA_BITS: tl.constexpr, MIN_EXPONENT: tl.constexpr, CODE_BITS: tl.constexpr):
    magnitude = code & ((1 << (CODE_BITS - 1)) - 1)
    field = magnitude >> MANTISSA_BITS
    mantissa = magnitude & ((1 << MANTISSA_BITS) - 1)
    steps = tl.where(field == 0, mantissa, mantissa + (1 << MANTISSA_BITS))
    exponent = tl.where(field == 0, MIN_EXPONENT - MANTISSA_BITS, field - 1 + MIN_EXPONENT - MANTISSA_BITS)
    value = steps.to(tl.float32) * ((exponent + 127) << 23).to(tl.float32, bitcast=True)
    return tl.where(((code >> (CODE_BITS - 1)) & 1) == 1, -value, value)


@triton.jit
def _storable_fp16(scale):
    scale = tl.where(scale > 0, scale, 1.0)
    scale = tl.minimum(tl.maximum(scale, FP16_TINY), FP16_MAX)
    return scale.to(tl.float16, fp_downcast_rounding="rtne").to(tl.float32)


@triton.jit
def _fit(W, in_group, global_scale, KIND: tl.constexpr, SCALE_RULE: tl.constexpr, SYMMETRIC: tl.constexpr,
         MAX_CODE: tl.constexpr, SYM_ZERO: tl.constexpr, ELEMENT_EMAX: tl.constexpr, E2M1_MAX: tl.constexpr,
         E4M3_MANTISSA_BITS: tl.constexpr, E4M3_MIN_EXPONENT: tl.constexpr, E4M3_MAX_VALUE: tl.constexpr,
         E4M3_CODE_BITS: tl.constexpr):
    """Scale and zero of every row for the columns flagged by `in_group`, as the format's `fit`."""
    amax = tl.max(tl.where(in_group, tl.abs(W), 0.0), axis=1)
    if KIND == 0:
        if SYMMETRIC:
            scale = _storable_fp16(tl.math.div_rn(amax, tl.full(amax.shape, SYM_ZERO - 1, tl.float32)))
            zero = tl.full(amax.shape, SYM_ZERO, tl.float32)
        else:
            lo = tl.minimum(tl.min(tl.where(in_group, W, float("inf")), axis=1), 0.0)
            hi = tl.maximum(tl.max(tl.where(in_group, W, -float("inf")), axis=1), 0.0)
            scale = _storable_fp16(tl.math.div_rn(hi - lo, tl.full(amax.shape, MAX_CODE, tl.float32)))
            zero = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(-lo, scale)), 0.0), MAX_CODE * 1.0)
            short = (lo < -((zero + 0.5) * scale)) | (hi > (MAX_CODE - zero + 0.5) * scale)
            up = (scale.to(tl.float16).to(tl.int16, bitcast=True) + 1).to(tl.float16, bitcast=True).to(tl.float32)
            scale = tl.where(short, up, scale)
            zero = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(-lo, scale)), 0.0), MAX_CODE * 1.0)
    elif SCALE_RULE == 0:
        shared = tl.minimum(tl.maximum(_floor_log2(amax) - ELEMENT_EMAX, -127), 127)
        scale = _pow2(shared)
        zero = tl.zeros(amax.shape, tl.float32)
    else:
        block_scale = tl.math.div_rn(amax, tl.full(amax.shape, E2M1_MAX, tl.float32)) * global_scale
        code = _element_encode(block_scale, E4M3_MANTISSA_BITS, E4M3_MIN_EXPONENT, E4M3_MAX_VALUE, E4M3_CODE_BITS)
        decoded = _element_decode(code, E4M3_MANTISSA_BITS, E4M3_MIN_EXPONENT, E4M3_CODE_BITS)
        scale = tl.math.div_rn(decoded, tl.full(amax.shape, 1.0, tl.float32) * global_scale)
        zero = tl.zeros(amax.shape, tl.float32)
    return scale, zero


@triton.jit
def _quantize(column, scale, zero, KIND: tl.constexpr, SYMMETRIC: tl.constexpr, MAX_CODE: tl.constexpr,
              MANTISSA_BITS: tl.constexpr, MIN_EXPONENT: tl.constexpr, MAX_VALUE: tl.constexpr,
              CODE_BITS: tl.constexpr):
    """(code, decoded value) of every element of `column` on its row's grid, as `encode` and `decode`."""
    if KIND == 0:
        low = 1.0 if SYMMETRIC else 0.0
        code = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(column, scale)) + zero, low), MAX_CODE * 1.0)
        value = (code - zero) * scale
    elif KIND == 1:
        nonzero = tl.where(scale > 0, scale, 1.0)
        bits = _element_encode(tl.math.div_rn(column, nonzero), MANTISSA_BITS, MIN_EXPONENT, MAX_VALUE, CODE_BITS)
        code = bits.to(tl.float32)
        value = _element_decode(bits, MANTISSA_BITS, MIN_EXPONENT, CODE_BITS) * scale
    else:
        nonzero = tl.where(scale > 0, scale, 1.0)
        k = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(column, nonzero) * 64.0), -128.0), 127.0)
        code = tl.where(k < 0, k + 256.0, k)
        value = (k * 0.015625) * scale
    return code, value


@triton.jit
def gptq_block_kernel(W_ptr, Hinv_ptr, col_scale_ptr, col_zero_ptr, global_scale_ptr, codes_ptr, errors_ptr,
                      fit_scale_ptr, fit_zero_ptr, rows, width, stride_w, stride_h, stride_col, stride_fit,
                      BLOCK_ROWS: tl.constexpr, WIDTH: tl.constexpr, GROUP: tl.constexpr, UP_FRONT: tl.constexpr,
                      KIND: tl.constexpr, SCALE_RULE: tl.constexpr, SYMMETRIC: tl.constexpr,
                      MAX_CODE: tl.constexpr, SYM_ZERO: tl.constexpr, MANTISSA_BITS: tl.constexpr,
                      MIN_EXPONENT: tl.constexpr, MAX_VALUE: tl.constexpr, CODE_BITS: tl.constexpr,
                      ELEMENT_EMAX: tl.constexpr, E4M3_MANTISSA_BITS: tl.constexpr,
                      E4M3_MIN_EXPONENT: tl.constexpr, E4M3_MAX_VALUE: tl.constexpr, E4M3_CODE_BITS: tl.constexpr):
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col = tl.arange(0, WIDTH)
    row_ok = row < rows
    tile_ok = row_ok[:, None] & (col[None, :] < width)
    W = tl.load(W_ptr + row[:, None] * stride_w + col[None, :], mask=tile_ok, other=0.0)
    codes = tl.zeros((BLOCK_ROWS, WIDTH), tl.float32)
    errors = tl.zeros((BLOCK_ROWS, WIDTH), tl.float32)
    global_scale = 1.0
    if SCALE_RULE == 1:
        global_scale = tl.load(global_scale_ptr)
    scale = tl.zeros((BLOCK_ROWS,), tl.float32)
    zero = tl.zeros((BLOCK_ROWS,), tl.float32)
    for i in range(0, width):
        if UP_FRONT:
            scale = tl.load(col_scale_ptr + row * stride_col + i, mask=row_ok, other=1.0)
            zero = tl.load(col_zero_ptr + row * stride_col + i, mask=row_ok, other=0.0)
        elif i % GROUP == 0:
            in_group = (col[None, :] >= i) & (col[None, :] < i + GROUP)
            scale, zero = _fit(W, in_group, global_scale, KIND, SCALE_RULE, SYMMETRIC, MAX_CODE, SYM_ZERO,
                               ELEMENT_EMAX, 6.0, E4M3_MANTISSA_BITS, E4M3_MIN_EXPONENT, E4M3_MAX_VALUE,
                               E4M3_CODE_BITS)
            tl.store(fit_scale_ptr + row * stride_fit + i // GROUP, scale, mask=row_ok)
            tl.store(fit_zero_ptr + row * stride_fit + i // GROUP, zero, mask=row_ok)
        here = col[None, :] == i
        column = tl.sum(tl.where(here, W, -0.0), axis=1)  # −0 is the identity of IEEE addition
        code, value = _quantize(column, scale, zero, KIND, SYMMETRIC, MAX_CODE, MANTISSA_BITS, MIN_EXPONENT,
                                MAX_VALUE, CODE_BITS)
        diagonal = tl.load(Hinv_ptr + i * stride_h + i)
        error = tl.math.div_rn(column - value, tl.full(column.shape, 1.0, tl.float32) * diagonal)
        h_row = tl.load(Hinv_ptr + i * stride_h + col, mask=(col > i) & (col < width), other=0.0)
        W = W - error[:, None] * h_row[None, :]
        codes = tl.where(here, code[:, None], codes)
        errors = tl.where(here, error[:, None], errors)
    tl.store(codes_ptr + row[:, None] * stride_w + col[None, :], codes, mask=tile_ok)
    tl.store(errors_ptr + row[:, None] * stride_w + col[None, :], errors, mask=tile_ok)

"""Triton kernels for x·Wᵀ with W in the kernel layout (layout.py), decoded in registers.

`KIND` (0 int, 1 ternary, 2 mxfp4, 3 nvfp4), the code width and the group size are compile-time constants; an
act_order permutation is applied while loading x, so a call is one kernel launch.

- `packed_gemv_kernel` (decode, one row of x per program): a [BLOCK_W words, BLOCK_N outputs] tile
  (the next one prefetched), each word's codes taken one position at a time (a shift by a constant),
  multiply-accumulated on CUDA cores into a float32 tile that is reduced once at the end. With `HALF`
  (int codes, float16 x) decoding and products run in float16, eight products per element summed in
  float16 before each tile's float32 accumulation. With `PAIRS` (int4, float16 x) two codes of a word
  are decoded, scaled and multiplied per f16x2 instruction through inline PTX (GPU only).
- `packed_gemv_rows_kernel` (small batches): the decode kernel for ROWS rows of x per program, each
  weight tile decoded once and multiplied into every row (no tensor cores, no layout conversion).
- `packed_gemm_kernel` (batches, prefill): a [BLOCK_K, BLOCK_N] tile dequantized to x's dtype for `tl.dot`.
- `base3_gemv_kernel`: the base-3 ternary layout, ROWS rows of x per program, its bytes split by
  division or through a 256-entry table of digits.

With SPLIT_K > 1 the programs of one output tile each cover a slice of the inputs and write float32
partial sums to a workspace; the last one to finish (a per-tile counter, reset by that program) adds them
and stores the result, so no zero-filled output or extra cast kernel is needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantbench.export.kernels.layout import KIND_CODES, KernelWeight


@triton.jit
def _e2m1(q):
    """E2M1 code → float32: |e,m| becomes an fp16 bit pattern whose value is 2^-14 times the element."""
    magnitude = ((q & 7) << 9).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * 16384.0
    return tl.where((q & 8) != 0, -magnitude, magnitude)


@triton.jit
def _e4m3(q):
    """Non-negative E4M3 code → float32, the same way: |e,m| placed in an fp16 pattern is 2^-8 times it."""
    return ((q & 0x7F) << 7).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * 256.0


@triton.jit
def _block_scale(raw, global_scale, KIND: tl.constexpr):
    """A block format's scale from its stored code: E8M0 → 2^(E − 127); E4M3 → e4m3 / g."""
    if KIND == 2:
        return tl.exp2(raw.to(tl.float32) - 127.0)
    return _e4m3(raw.to(tl.int32)) / global_scale


@triton.jit
def _small_int_to_float(q):
    """Non-negative int32 < 2^23 → float32 without a conversion instruction (those run at a quarter of
    the FMA rate): OR it into the mantissa of 2^23, then subtract 2^23."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _half2(lo, hi):
    """Two float16 values in one int32 (lo in bits 0–15), the operand of f16x2 instructions."""
    low = lo.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return low | (hi.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) << 16)


@triton.jit
def _int4_pair_fma(words, zero2, scale2, x2, acc2):
    """acc2 + ((1024 + q) − (1024 + z))·s·x for the codes at bits 0–3 and 16–19 of each word, in f16x2
    lanes: one LOP3 puts both codes into float16 1024 + q (Marlin's and ExLlama's decode), the subtraction
    is exact, and the scale and the product round as a float16 dequantized weight would. GPU only."""
    return tl.inline_asm_elementwise(
        """{
        .reg .b32 t, v;
        lop3.b32 t, $1, 0x000f000f, 0x64006400, 0xea;
        sub.f16x2 v, t, $2;
        mul.f16x2 v, v, $3;
        fma.rn.f16x2 $0, v, $4, $5;
        }""",
        "=r,r,r,r,r,r", [words, zero2, scale2, x2, acc2], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _half2_sum(acc2):
    """float32 sum of an int32's two float16 lanes."""
    return tl.inline_asm_elementwise(
        """{
        .reg .b16 lo, hi;
        .reg .f32 a, b;
        mov.b32 {lo, hi}, $1;
        cvt.f32.f16 a, lo;
        cvt.f32.f16 b, hi;
        add.f32 $0, a, b;
        }""",
        "=r,r", [acc2], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _word_tile_params(s_ptr, z_ptr, w0, rows, mask_r, offs_n, mask_n, N, n_groups, global_scale,
                      KIND: tl.constexpr, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, GROUP: tl.constexpr,
                      BLOCK_W: tl.constexpr):
    """(scale, offset, second, zero) of a [BLOCK_W words, BLOCK_N outputs] tile, each a row when one group
    spans the tile: w = code·scale − offset with offset = zero·scale (int), code₁·scale + code₂·second −
    offset (ternary pairs), e2m1(code)·scale (MX, NV); the unused ones are placeholders."""
    PER: tl.constexpr = 32 // BITS
    if GROUP >= BLOCK_W * PER:
        params = (w0 * PER // GROUP) * N + offs_n[None, :]
        params_mask = mask_n[None, :]
    else:
        params = ((rows * PER) // GROUP)[:, None] * N + offs_n[None, :]
        params_mask = mask_r[:, None] & mask_n[None, :]
    raw = tl.load(s_ptr + params, mask=params_mask, other=0)
    scale = raw.to(tl.float32)
    second = scale
    zero = scale
    if KIND == 0:
        if HAS_ZEROS:
            zero = tl.load(z_ptr + params, mask=params_mask, other=0).to(tl.float32)
        else:
            zero = tl.zeros_like(scale) + (1 << (BITS - 1))
        offset = zero * scale
    elif KIND == 1:
        second = tl.load(s_ptr + n_groups * N + params, mask=params_mask, other=0).to(tl.float32)
        offset = scale + second
    else:
        scale = _block_scale(raw, global_scale, KIND)
        offset = scale
    return scale, offset, second, zero


@triton.jit
def _position_weights(words, i: tl.constexpr, scale, offset, second, KIND: tl.constexpr, BITS: tl.constexpr):
    """float32 weights of the i-th code of every word in the tile."""
    codes = (words >> (i * BITS)) & ((1 << BITS) - 1)
    if KIND == 0:
        w = _small_int_to_float(codes) * scale - offset
    elif KIND == 1:
        w = (_small_int_to_float(codes & 3) * scale + _small_int_to_float(codes >> 2) * second) - offset
    else:
        w = _e2m1(codes) * scale
    return w


@triton.jit
def _params(ptr, offs_k, k0, offs_n, mask_n, K, N, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """The per-group tensor at (input, output): one row per tile when a group spans the tile."""
    if GROUP >= BLOCK_K:
        values = tl.load(ptr + (k0 // GROUP) * N + offs_n, mask=mask_n, other=0)[None, :]
    else:
        values = tl.load(ptr + (offs_k // GROUP)[:, None] * N + offs_n[None, :],
                         mask=(offs_k < K)[:, None] & mask_n[None, :], other=0)
    return values


@triton.jit
def _dequantized_tile(w_ptr, s_ptr, z_ptr, k0, offs_n, mask_n, K, N, n_groups, global_scale,
                      KIND: tl.constexpr, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, GROUP: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, EXPAND: tl.constexpr, HALF: tl.constexpr):
    """float32 [BLOCK_K, BLOCK_N] weights of inputs k0… and outputs offs_n (HALF, int codes: float16, from
    1024 + q − (1024 + z), exact, times the float16 scale: the float32 value rounded once, bit for bit).
    EXPAND loads each word once and splits it into a [words, per_word, outputs] block reshaped to the tile;
    otherwise every row of the tile loads its word (cache hits for all but the first)."""
    PER: tl.constexpr = 32 // BITS
    offs_k = k0 + tl.arange(0, BLOCK_K)
    if EXPAND:
        rows = k0 // PER + tl.arange(0, BLOCK_K // PER)
        words = tl.load(w_ptr + rows[:, None] * N + offs_n[None, :],
                        mask=(rows < K // PER)[:, None] & mask_n[None, :], other=0)
        shifts = tl.arange(0, PER) * BITS
        codes = tl.reshape((words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1), (BLOCK_K, BLOCK_N))
    else:
        words = tl.load(w_ptr + (offs_k // PER)[:, None] * N + offs_n[None, :],
                        mask=(offs_k < K)[:, None] & mask_n[None, :], other=0)
        codes = (words >> ((offs_k % PER) * BITS)[:, None]) & ((1 << BITS) - 1)
    scale = _params(s_ptr, offs_k, k0, offs_n, mask_n, K, N, GROUP, BLOCK_K)
    if KIND == 0 and HALF:
        if HAS_ZEROS:
            zero = _params(z_ptr, offs_k, k0, offs_n, mask_n, K, N, GROUP, BLOCK_K).to(tl.float16) + 1024.0
        else:
            zero = tl.full((1, BLOCK_N), (1 << (BITS - 1)) + 1024, tl.float16)
        w = ((codes | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - zero.to(tl.float16)) * scale.to(tl.float16)
    elif KIND == 0:
        scale = scale.to(tl.float32)
        if HAS_ZEROS:
            zero = _params(z_ptr, offs_k, k0, offs_n, mask_n, K, N, GROUP, BLOCK_K).to(tl.float32)
        else:
            zero = (1 << (BITS - 1)) * 1.0
        w = _small_int_to_float(codes) * scale - zero * scale
    elif KIND == 1:
        first = scale.to(tl.float32)
        second = _params(s_ptr + n_groups * N, offs_k, k0, offs_n, mask_n, K, N, GROUP, BLOCK_K).to(tl.float32)
        w = _small_int_to_float(codes & 3) * first + _small_int_to_float(codes >> 2) * second - (first + second)
    else:
        w = _e2m1(codes) * _block_scale(scale, global_scale, KIND)
    return w


@triton.jit
def _finish(acc, out_ptr, offsets, mask, ws_ptr, ws_stride, lock_ptr, lock, pid_k, SPLIT_K: tl.constexpr):
    """Store the tile, or (split over the inputs) park it in the workspace; the slice that finishes last
    sums every slice's tile into the output and resets the tile's counter."""
    if SPLIT_K == 1:
        tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ws_ptr + pid_k * ws_stride + offsets, acc, mask=mask)
        done = tl.atomic_add(lock_ptr + lock, 1)  # acq_rel: the stores above are visible to the last one
        if done == SPLIT_K - 1:
            total = tl.zeros_like(acc)
            for part in tl.static_range(SPLIT_K):
                total += tl.load(ws_ptr + part * ws_stride + offsets, mask=mask, other=0, cache_modifier=".cg")
            tl.store(out_ptr + offsets, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(lock_ptr + lock, 0)


@triton.jit
def _input_column(x_row, perm_ptr, inputs, mask, HAS_PERM: tl.constexpr):
    """x at stored inputs `inputs` (original input perm[k] under act_order)."""
    if HAS_PERM:
        inputs = tl.load(perm_ptr + inputs, mask=mask, other=0)
    return tl.load(x_row + inputs, mask=mask, other=0)


@triton.jit
def _word_span(pid_k, k_per_split, K, PER: tl.constexpr):
    """The words [begin, end) of the inputs this split-K slice covers."""
    begin = pid_k * (k_per_split // PER)
    return begin, tl.minimum(begin + k_per_split // PER, K // PER)


@triton.jit
def _word_tile(w_ptr, rows, end, offs_n, mask_n, N):
    """int32 words [rows, outputs], zero past `end` and past the last output."""
    return tl.load(w_ptr + rows[:, None] * N + offs_n[None, :], mask=(rows < end)[:, None] & mask_n[None, :], other=0)


@triton.jit
def packed_gemv_kernel(x_ptr, perm_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, lock_ptr,
                       N, K, n_groups, k_per_split, stride_xm, global_scale,
                       KIND: tl.constexpr, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_PERM: tl.constexpr,
                       GROUP: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
                       HALF: tl.constexpr, PAIRS: tl.constexpr):
    PER: tl.constexpr = 32 // BITS
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    w_begin, w_end = _word_span(pid_k, k_per_split, K, PER)
    acc = tl.zeros((BLOCK_W, BLOCK_N), dtype=tl.float32)
    x_row = x_ptr + pid_m * stride_xm
    next_words = _word_tile(w_ptr, w_begin + tl.arange(0, BLOCK_W), w_end, offs_n, mask_n, N)
    for w0 in range(w_begin, w_end, BLOCK_W):
        rows = w0 + tl.arange(0, BLOCK_W)
        mask_r = rows < w_end
        words = next_words  # the next tile's words are in flight while this one is decoded
        next_words = _word_tile(w_ptr, rows + BLOCK_W, w_end, offs_n, mask_n, N)
        first_k = rows * PER
        scale, offset, second, zero = _word_tile_params(s_ptr, z_ptr, w0, rows, mask_r, offs_n, mask_n, N,
                                                        n_groups, global_scale, KIND, BITS, HAS_ZEROS, GROUP,
                                                        BLOCK_W)
        if PAIRS:  # int4, float16 x: two codes per instruction (inline PTX, so never under the interpreter)
            scale2 = tl.broadcast_to(_half2(scale, scale), (BLOCK_W, BLOCK_N))
            zero2 = tl.broadcast_to(_half2(zero + 1024.0, zero + 1024.0), (BLOCK_W, BLOCK_N))
            part = tl.zeros((BLOCK_W, BLOCK_N), dtype=tl.int32)  # 0x00000000: two float16 zeros
            for j in tl.static_range(4):
                x2 = _half2(_input_column(x_row, perm_ptr, first_k + j, mask_r, HAS_PERM),
                            _input_column(x_row, perm_ptr, first_k + j + 4, mask_r, HAS_PERM))
                x2 = tl.broadcast_to(x2[:, None], (BLOCK_W, BLOCK_N))
                part = _int4_pair_fma(words >> (4 * j), zero2, scale2, x2, part)
            acc += _half2_sum(part)
        elif HALF and KIND == 0:  # decode and multiply in float16 (paired f16x2 instructions), sum per tile in float32
            scale16 = scale.to(tl.float16)
            zero16 = (zero + 1024.0).to(tl.float16)  # 1024 + z, exact in float16
            part = tl.zeros((BLOCK_W, BLOCK_N), dtype=tl.float16)
            for i in tl.static_range(PER):
                x = _input_column(x_row, perm_ptr, first_k + i, mask_r, HAS_PERM).to(tl.float16)[:, None]
                codes = ((words >> (i * BITS)) & ((1 << BITS) - 1)) | 0x6400  # float16 1024 + q
                value = codes.to(tl.int16).to(tl.float16, bitcast=True)
                part += ((value - zero16) * scale16) * x
            acc += part.to(tl.float32)
        else:
            for i in tl.static_range(PER):
                x = _input_column(x_row, perm_ptr, first_k + i, mask_r, HAS_PERM).to(tl.float32)[:, None]
                acc += _position_weights(words, i, scale, offset, second, KIND, BITS) * x
    _finish(tl.sum(acc, axis=0), out_ptr, pid_m * N + offs_n, mask_n, ws_ptr, N * tl.num_programs(2),
            lock_ptr, pid_m * tl.num_programs(0) + pid_n, pid_k, SPLIT_K)


@triton.jit
def packed_gemv_rows_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, lock_ptr,
                            M, N, K, n_groups, k_per_split, stride_xm, global_scale,
                            KIND: tl.constexpr, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, GROUP: tl.constexpr,
                            BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, ROWS: tl.constexpr):
    """x in the stored input order (a batch gathers act_order once before the call)."""
    PER: tl.constexpr = 32 // BITS
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_m = pid_m * ROWS + tl.arange(0, ROWS)
    mask_m = offs_m < M
    w_begin, w_end = _word_span(pid_k, k_per_split, K, PER)
    acc = tl.zeros((ROWS, BLOCK_W, BLOCK_N), dtype=tl.float32)
    next_words = _word_tile(w_ptr, w_begin + tl.arange(0, BLOCK_W), w_end, offs_n, mask_n, N)
    for w0 in range(w_begin, w_end, BLOCK_W):
        rows = w0 + tl.arange(0, BLOCK_W)
        mask_r = rows < w_end
        words = next_words
        next_words = _word_tile(w_ptr, rows + BLOCK_W, w_end, offs_n, mask_n, N)
        scale, offset, second, zero = _word_tile_params(s_ptr, z_ptr, w0, rows, mask_r, offs_n, mask_n, N,
                                                        n_groups, global_scale, KIND, BITS, HAS_ZEROS, GROUP,
                                                        BLOCK_W)
        for i in tl.static_range(PER):
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (rows * PER + i)[None, :],
                        mask=mask_m[:, None] & mask_r[None, :], other=0).to(tl.float32)
            acc += _position_weights(words, i, scale, offset, second, KIND, BITS)[None, :, :] * x[:, :, None]
    _finish(tl.sum(acc, axis=1), out_ptr, offs_m[:, None] * N + offs_n[None, :], mask_m[:, None] & mask_n[None, :],
            ws_ptr, M * N, lock_ptr, pid_m * tl.num_programs(0) + pid_n, pid_k, SPLIT_K)


@triton.jit
def packed_gemm_kernel(x_ptr, perm_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, lock_ptr,
                       M, N, K, n_groups, k_per_split, stride_xm, global_scale,
                       KIND: tl.constexpr, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_PERM: tl.constexpr,
                       GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       SPLIT_K: tl.constexpr, EXPAND: tl.constexpr, HALF: tl.constexpr,
                       PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        w = _dequantized_tile(w_ptr, s_ptr, z_ptr, k0, offs_n, mask_n, K, N, n_groups, global_scale,
                              KIND, BITS, HAS_ZEROS, GROUP, BLOCK_K, BLOCK_N, EXPAND, HALF)
        if HAS_PERM:
            columns = tl.load(perm_ptr + offs_k, mask=mask_k, other=0)
        else:
            columns = offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + columns[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0)
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=PRECISION)
    _finish(acc, out_ptr, offs_m[:, None] * N + offs_n[None, :], mask_m[:, None] & mask_n[None, :],
            ws_ptr, M * N, lock_ptr, pid_m * tl.num_programs(0) + pid_n, pid_k, SPLIT_K)


@triton.jit
def _trit(b, j: tl.constexpr, LUT: tl.constexpr):
    """Trit j of base-3 bytes b, or (LUT) of their lookup-table words, as float32 in {−1, 0, 1}."""
    if LUT:
        digit = (b >> (2 * j)) & 3
    else:
        digit = (b // (3 ** j)) % 3
    return _small_int_to_float(digit) - 1.0


@triton.jit
def base3_gemv_kernel(x_ptr, w_ptr, s_ptr, lut_ptr, out_ptr, ws_ptr, lock_ptr, M, N, K, n_groups,
                      groups_per_split, stride_xm, GROUP: tl.constexpr, BYTES: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, ROWS: tl.constexpr, LUT: tl.constexpr):
    """Decode for the base-3 ternary layout (`ternary3`), ROWS rows of x per program: per group, each plane's
    bytes [BLOCK_R rows, BLOCK_N outputs] are split digit by digit (b // 3^j mod 3, or with LUT one load of
    a 256-entry table of 2-bit digits per byte), the trits times x summed per plane, and each plane's sum
    scaled once per group."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_m = pid_m * ROWS + tl.arange(0, ROWS)
    mask_m = offs_m < M
    plane = n_groups * BYTES * N  # the second plane's offset
    total = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    g_begin = pid_k * groups_per_split
    g_end = tl.minimum(g_begin + groups_per_split, n_groups)
    for g in range(g_begin, g_end):
        first = tl.zeros((ROWS, BLOCK_R, BLOCK_N), dtype=tl.float32)
        second = tl.zeros((ROWS, BLOCK_R, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, BYTES, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            mask = (rows < BYTES)[:, None] & mask_n[None, :]
            offsets = (g * BYTES + rows)[:, None] * N + offs_n[None, :]
            b1 = tl.load(w_ptr + offsets, mask=mask, other=121).to(tl.int32)  # 121: five zero trits
            b2 = tl.load(w_ptr + plane + offsets, mask=mask, other=121).to(tl.int32)
            if LUT:
                b1 = tl.load(lut_ptr + b1)
                b2 = tl.load(lut_ptr + b2)
            for j in tl.static_range(5):
                within = rows * 5 + j
                inputs = g * GROUP + within
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + inputs[None, :],
                            mask=mask_m[:, None] & ((within < GROUP) & (inputs < K))[None, :],
                            other=0).to(tl.float32)[:, :, None]
                first += _trit(b1, j, LUT)[None, :, :] * x
                second += _trit(b2, j, LUT)[None, :, :] * x
        alpha1 = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.float32)
        alpha2 = tl.load(s_ptr + (n_groups + g) * N + offs_n, mask=mask_n, other=0).to(tl.float32)
        total += alpha1[None, :] * tl.sum(first, axis=1) + alpha2[None, :] * tl.sum(second, axis=1)
    _finish(total, out_ptr, offs_m[:, None] * N + offs_n[None, :], mask_m[:, None] & mask_n[None, :], ws_ptr,
            M * N, lock_ptr, pid_m * tl.num_programs(0) + pid_n, pid_k, SPLIT_K)


_workspaces: dict[tuple, torch.Tensor] = {}


def _scratch(kind: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reused buffer of at least `numel` elements (counters start at zero and are left at zero)."""
    key = (kind, device)
    buffer = _workspaces.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = _workspaces[key] = torch.zeros(max(numel, 1 << 16), dtype=dtype, device=device)
    return buffer


def launch(x: torch.Tensor, weight: KernelWeight, block_m: int, block_n: int, block_k: int, split_k: int,
           num_warps: int = 4, num_stages: int = 2, expand: bool = True, half: bool = False,
           rows: int = 1, pairs: bool = False) -> torch.Tensor:
    """x [M, K] contiguous, in the original input order → [M, N] in x's dtype.

    - block_m = 1: the decode kernel on each row of x (`half`: in float16 when x is; `pairs`: int4 in
      f16x2 lanes through inline PTX, CUDA only), or with rows > 1 on that many rows per program (x
      already in the stored order).
    - block_m ≥ 16: the tl.dot kernel (`expand`: split loaded words instead of loading a word per row;
      `half`: int codes dequantized in float16 when x is)."""
    m, k = x.shape
    n = weight.shape[0]
    block_k = max(block_k, weight.per_word)
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, block_n), split_k, triton.cdiv(m, rows if block_m == 1 else block_m))
    workspace = _scratch("workspace", split_k * m * n if split_k > 1 else 1, torch.float32, x.device)
    locks = _scratch("locks", grid[0] * grid[2], torch.int32, x.device)
    zeros = weight.zeros if weight.zeros is not None else weight.scales
    perm = weight.perm if weight.perm is not None else weight.scales
    common = dict(KIND=KIND_CODES[weight.kind], BITS=weight.bits, HAS_ZEROS=weight.zeros is not None,
                  HAS_PERM=weight.perm is not None, GROUP=weight.group, SPLIT_K=split_k,
                  num_warps=num_warps, num_stages=num_stages)
    if block_m == 1 and rows > 1:
        if weight.perm is not None:
            raise ValueError("the multi-row decode kernel reads x in the stored order: gather act_order first")
        packed_gemv_rows_kernel[grid](x, weight.qweight, weight.scales, zeros, out, workspace, locks,
                                      m, n, k, weight.n_groups, k_per_split, x.stride(0), weight.global_scale,
                                      KIND=common["KIND"], BITS=weight.bits, HAS_ZEROS=weight.zeros is not None,
                                      GROUP=weight.group, SPLIT_K=split_k, BLOCK_W=block_k // weight.per_word,
                                      BLOCK_N=block_n, ROWS=rows, num_warps=num_warps, num_stages=num_stages)
    elif block_m == 1:
        packed_gemv_kernel[grid](x, perm, weight.qweight, weight.scales, zeros, out, workspace, locks,
                                 n, k, weight.n_groups, k_per_split, x.stride(0), weight.global_scale,
                                 BLOCK_W=block_k // weight.per_word, BLOCK_N=block_n,
                                 HALF=half and x.dtype == torch.float16 and weight.bits <= 8,
                                 PAIRS=pairs and x.dtype == torch.float16 and weight.kind == "int" and weight.bits == 4,
                                 **common)
    else:
        packed_gemm_kernel[grid](x, perm, weight.qweight, weight.scales, zeros, out, workspace, locks,
                                 m, n, k, weight.n_groups, k_per_split, x.stride(0), weight.global_scale,
                                 BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, EXPAND=expand,
                                 HALF=half and x.dtype == torch.float16 and weight.kind == "int",
                                 PRECISION=dot_precision(x.dtype), **common)
    return out


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's precision for float32 x as torch's own float32 matmuls take it: IEEE float32 unless TF32 is
    allowed (`torch.backends.cuda.matmul.allow_tf32`); half-precision inputs are exact either way."""
    return "tf32" if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"


def launch_base3(x: torch.Tensor, weight: KernelWeight, block_r: int, block_n: int, split_k: int,
                 num_warps: int = 4, rows: int = 1, lut: bool = False) -> torch.Tensor:
    """x [M, K] contiguous → [M, N] through `base3_gemv_kernel`, `rows` rows of x per program; `split_k`
    spreads the groups over that many programs per output tile; `lut` decodes bytes through the table."""
    m, k = x.shape
    n = weight.shape[0]
    n_groups = triton.cdiv(k, weight.group)
    groups_per_split = triton.cdiv(n_groups, split_k)
    split_k = triton.cdiv(n_groups, groups_per_split)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, block_n), split_k, triton.cdiv(m, rows))
    workspace = _scratch("workspace", split_k * m * n if split_k > 1 else 1, torch.float32, x.device)
    locks = _scratch("locks", grid[0] * grid[2], torch.int32, x.device)
    base3_gemv_kernel[grid](x, weight.qweight, weight.scales, _base3_digits(x.device), out, workspace, locks, m, n,
                            k, n_groups, groups_per_split, x.stride(0), GROUP=weight.group,
                            BYTES=triton.cdiv(weight.group, 5), BLOCK_R=block_r, BLOCK_N=block_n,
                            SPLIT_K=split_k, ROWS=rows, LUT=lut, num_warps=num_warps)
    return out


_digit_tables: dict[torch.device, torch.Tensor] = {}


def _base3_digits(device: torch.device) -> torch.Tensor:
    """int32 [256]: byte b → its five base-3 digits in 2-bit fields (digit j at bits 2j, 2j + 1)."""
    if device not in _digit_tables:
        b = torch.arange(256)
        digits = torch.stack([(b // 3 ** j) % 3 for j in range(5)], dim=1)
        _digit_tables[device] = (digits << (2 * torch.arange(5))).sum(dim=1).int().to(device)
    return _digit_tables[device]

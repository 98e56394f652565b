"""Triton kernels for x·Wᵀ with W in the kernel layout (layout.py), decoded in registers.

`KIND` (0 int, 1 ternary, 2 mxfp4, 3 nvfp4), the code width and the group size are compile-time constants; an
act_order permutation is applied while loading x, so a call is one kernel launch.

- `packed_gemv_kernel` (decode, one row of x per program): a [BLOCK_W words, BLOCK_N outputs] tile
  (the next one prefetched), each word's codes taken one position at a time (a shift by a constant),
  multiply-accumulated on CUDA cores into a float32 tile that is reduced once at the end. With `HALF`
  (int codes, float16 x) decoding and products run in float16, eight products per element summed in
  float16 before each tile's float32 accumulation.
- `packed_gemm_kernel` (batches, prefill): a [BLOCK_K, BLOCK_N] tile dequantized to x's dtype for `tl.dot`.
- `base3_gemv_kernel`: the base-3 ternary layout, a row of x per program at any batch.

With SPLIT_K > 1 the programs of one output tile each cover a slice of the inputs and write float32
partial sums to a workspace; the last one to finish (a per-tile counter, reset by that program) adds them
and stores the result, so no zero-filled output or extra cast kernel is needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantbench.export.kernels.layout import KernelWeight

KINDS = {"int": 0, "ternary": 1, "mxfp4": 2, "nvfp4": 3}


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
                      BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, EXPAND: tl.constexpr):
    """float32 [BLOCK_K, BLOCK_N] weights of inputs k0… and outputs offs_n. EXPAND loads each word once
    and splits it into a [words, per_word, outputs] block reshaped to the tile; otherwise every row of the
    tile loads its word (cache hits for all but the first)."""
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
    if KIND == 0:
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
def packed_gemv_kernel(x_ptr, perm_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, lock_ptr,
                       N, K, n_groups, k_per_split, stride_xm, global_scale,
                       KIND: tl.constexpr, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_PERM: tl.constexpr,
                       GROUP: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
                       HALF: tl.constexpr):
    PER: tl.constexpr = 32 // BITS
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    n_words = K // PER
    w_begin = pid_k * (k_per_split // PER)
    w_end = tl.minimum(w_begin + k_per_split // PER, n_words)
    acc = tl.zeros((BLOCK_W, BLOCK_N), dtype=tl.float32)
    x_row = x_ptr + pid_m * stride_xm
    rows = w_begin + tl.arange(0, BLOCK_W)
    mask_r = rows < w_end
    next_words = tl.load(w_ptr + rows[:, None] * N + offs_n[None, :], mask=mask_r[:, None] & mask_n[None, :], other=0)
    for w0 in range(w_begin, w_end, BLOCK_W):
        rows = w0 + tl.arange(0, BLOCK_W)
        mask_r = rows < w_end
        words = next_words
        ahead = rows + BLOCK_W  # the next tile's words are in flight while this one is decoded
        next_words = tl.load(w_ptr + ahead[:, None] * N + offs_n[None, :],
                             mask=(ahead < w_end)[:, None] & mask_n[None, :], other=0)
        first_k = rows * PER
        if GROUP >= BLOCK_W * PER:
            params = (w0 * PER // GROUP) * N + offs_n[None, :]
            params_mask = mask_n[None, :]
        else:
            params = (first_k // GROUP)[:, None] * N + offs_n[None, :]
            params_mask = mask_r[:, None] & mask_n[None, :]
        raw = tl.load(s_ptr + params, mask=params_mask, other=0)
        scale = raw.to(tl.float32)
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
        if HALF and KIND == 0:  # decode and multiply in float16 (paired f16x2 instructions), sum per tile in float32
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
                codes = (words >> (i * BITS)) & ((1 << BITS) - 1)
                if KIND == 0:
                    w = _small_int_to_float(codes) * scale - offset
                elif KIND == 1:
                    w = (_small_int_to_float(codes & 3) * scale + _small_int_to_float(codes >> 2) * second) - offset
                else:
                    w = _e2m1(codes) * scale
                acc += w * x
    _finish(tl.sum(acc, axis=0), out_ptr, pid_m * N + offs_n, mask_n, ws_ptr, N * tl.num_programs(2),
            lock_ptr, pid_m * tl.num_programs(0) + pid_n, pid_k, SPLIT_K)


@triton.jit
def packed_gemm_kernel(x_ptr, perm_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, lock_ptr,
                       M, N, K, n_groups, k_per_split, stride_xm, global_scale,
                       KIND: tl.constexpr, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_PERM: tl.constexpr,
                       GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       SPLIT_K: tl.constexpr, EXPAND: tl.constexpr):
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
                              KIND, BITS, HAS_ZEROS, GROUP, BLOCK_K, BLOCK_N, EXPAND)
        if HAS_PERM:
            columns = tl.load(perm_ptr + offs_k, mask=mask_k, other=0)
        else:
            columns = offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + columns[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0)
        acc = tl.dot(x, w.to(x.dtype), acc)
    _finish(acc, out_ptr, offs_m[:, None] * N + offs_n[None, :], mask_m[:, None] & mask_n[None, :],
            ws_ptr, M * N, lock_ptr, pid_m * tl.num_programs(0) + pid_n, pid_k, SPLIT_K)


@triton.jit
def base3_gemv_kernel(x_ptr, w_ptr, s_ptr, out_ptr, ws_ptr, lock_ptr, N, K, n_groups, groups_per_split,
                      stride_xm, GROUP: tl.constexpr, BYTES: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr):
    """Decode for the base-3 ternary layout (`ternary3`), one row of x per program: per group, each plane's
    bytes [BLOCK_R rows, BLOCK_N outputs] are split digit by digit (b mod 3, then b // 3), the trits
    (digit − 1) times x summed per plane, and each plane's sum scaled once per group."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    x_row = x_ptr + pid_m * stride_xm
    plane = n_groups * BYTES * N  # the second plane's offset
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    g_begin = pid_k * groups_per_split
    g_end = tl.minimum(g_begin + groups_per_split, n_groups)
    for g in range(g_begin, g_end):
        first = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
        second = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, BYTES, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            mask = (rows < BYTES)[:, None] & mask_n[None, :]
            offsets = (g * BYTES + rows)[:, None] * N + offs_n[None, :]
            b1 = tl.load(w_ptr + offsets, mask=mask, other=121).to(tl.int32)  # 121: five zero trits
            b2 = tl.load(w_ptr + plane + offsets, mask=mask, other=121).to(tl.int32)
            for j in tl.static_range(5):
                within = rows * 5 + j
                inputs = g * GROUP + within
                x = tl.load(x_row + inputs, mask=(within < GROUP) & (inputs < K), other=0).to(tl.float32)[:, None]
                first += ((b1 % 3) - 1).to(tl.float32) * x
                second += ((b2 % 3) - 1).to(tl.float32) * x
                b1 = b1 // 3
                b2 = b2 // 3
        alpha1 = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.float32)
        alpha2 = tl.load(s_ptr + (n_groups + g) * N + offs_n, mask=mask_n, other=0).to(tl.float32)
        total += alpha1 * tl.sum(first, axis=0) + alpha2 * tl.sum(second, axis=0)
    _finish(total, out_ptr, pid_m * N + offs_n, mask_n, ws_ptr, N * tl.num_programs(2),
            lock_ptr, pid_m * tl.num_programs(0) + pid_n, pid_k, SPLIT_K)


_workspaces: dict[tuple, torch.Tensor] = {}


def _scratch(kind: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reused buffer of at least `numel` elements (counters start at zero and are left at zero)."""
    key = (kind, device)
    buffer = _workspaces.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = _workspaces[key] = torch.zeros(max(numel, 1 << 16), dtype=dtype, device=device)
    return buffer


def launch(x: torch.Tensor, weight: KernelWeight, block_m: int, block_n: int, block_k: int, split_k: int,
           num_warps: int = 4, num_stages: int = 2, expand: bool = True, half: bool = False) -> torch.Tensor:
    """x [M, K] contiguous, in the original input order → [M, N] in x's dtype. block_m = 1 runs the
    decode kernel on each row of x (`half`: in float16 when x is); larger block_m the tl.dot kernel
    (`expand`: split loaded words instead of loading a word per row)."""
    m, k = x.shape
    n = weight.shape[0]
    block_k = max(block_k, weight.per_word)
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, block_n), split_k, m if block_m == 1 else triton.cdiv(m, block_m))
    workspace = _scratch("workspace", split_k * m * n if split_k > 1 else 1, torch.float32, x.device)
    locks = _scratch("locks", grid[0] * grid[2], torch.int32, x.device)
    zeros = weight.zeros if weight.zeros is not None else weight.scales
    perm = weight.perm if weight.perm is not None else weight.scales
    common = dict(KIND=KINDS[weight.kind], BITS=weight.bits, HAS_ZEROS=weight.zeros is not None,
                  HAS_PERM=weight.perm is not None, GROUP=weight.group, SPLIT_K=split_k,
                  num_warps=num_warps, num_stages=num_stages)
    if block_m == 1:
        packed_gemv_kernel[grid](x, perm, weight.qweight, weight.scales, zeros, out, workspace, locks,
                                 n, k, weight.n_groups, k_per_split, x.stride(0), weight.global_scale,
                                 BLOCK_W=block_k // weight.per_word, BLOCK_N=block_n,
                                 HALF=half and x.dtype == torch.float16 and weight.bits <= 8, **common)
    else:
        packed_gemm_kernel[grid](x, perm, weight.qweight, weight.scales, zeros, out, workspace, locks,
                                 m, n, k, weight.n_groups, k_per_split, x.stride(0), weight.global_scale,
                                 BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, EXPAND=expand, **common)
    return out


def launch_base3(x: torch.Tensor, weight: KernelWeight, block_r: int, block_n: int, split_k: int,
                 num_warps: int = 4) -> torch.Tensor:
    """x [M, K] contiguous → [M, N] through `base3_gemv_kernel`, one program row per row of x; `split_k`
    spreads the groups over that many programs per output tile."""
    m, k = x.shape
    n = weight.shape[0]
    n_groups = triton.cdiv(k, weight.group)
    groups_per_split = triton.cdiv(n_groups, split_k)
    split_k = triton.cdiv(n_groups, groups_per_split)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, block_n), split_k, m)
    workspace = _scratch("workspace", split_k * m * n if split_k > 1 else 1, torch.float32, x.device)
    locks = _scratch("locks", grid[0] * grid[2], torch.int32, x.device)
    base3_gemv_kernel[grid](x, weight.qweight, weight.scales, out, workspace, locks, n, k, n_groups,
                            groups_per_split, x.stride(0), GROUP=weight.group,
                            BYTES=triton.cdiv(weight.group, 5), BLOCK_R=block_r, BLOCK_N=block_n,
                            SPLIT_K=split_k, num_warps=num_warps)
    return out

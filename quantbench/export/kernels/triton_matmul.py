"""Triton kernels for x·Wᵀ with W in the kernel layout (layout.py), decoded in registers.

One kernel body serves every kind; `KIND` (0 int, 1 ternary, 2 mxfp4) and the widths are compile-time
constants. A program owns BLOCK_N outputs and one of split_k slices of the inputs, and dequantizes a
[BLOCK_K, BLOCK_N] tile of weights per step in registers.

- Decode (M = 1, `BLOCK_M = 1`): multiply-accumulate on CUDA cores into a [BLOCK_K, BLOCK_N] float32
  partial sum, reduced over the inputs once at the end.
- Batches and prefill (`BLOCK_M ≥ 16`): the tile is cast to x's dtype and fed to `tl.dot`.

Slices of the inputs (split_k > 1, `ATOMIC`) add their partial sums atomically into a float32 output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantbench.export.kernels.layout import KernelWeight

KINDS = {"int": 0, "ternary": 1, "mxfp4": 2}


@triton.jit
def _e2m1(q):
    """E2M1 code → float32: |e,m| becomes an fp16 bit pattern whose value is 2^-14 times the element."""
    magnitude = ((q & 7) << 9).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * 16384.0
    return tl.where((q & 8) != 0, -magnitude, magnitude)


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
def _dequantized_tile(w_ptr, s_ptr, z_ptr, k0, offs_n, mask_n, K, N, n_groups,
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
        w = _e2m1(codes) * tl.exp2(scale.to(tl.float32) - 127.0)
    return w


@triton.jit
def packed_matmul_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr,
                         M, N, K, n_groups, k_per_split, stride_xm, stride_om,
                         KIND: tl.constexpr, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, GROUP: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         ATOMIC: tl.constexpr, EXPAND: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    if BLOCK_M == 1:
        partial = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = _dequantized_tile(w_ptr, s_ptr, z_ptr, k0, offs_n, mask_n, K, N, n_groups,
                              KIND, BITS, HAS_ZEROS, GROUP, BLOCK_K, BLOCK_N, EXPAND)
        if BLOCK_M == 1:
            x = tl.load(x_ptr + pid_m * stride_xm + offs_k, mask=offs_k < K, other=0).to(tl.float32)
            partial += w * x[:, None]
        else:
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=mask_m[:, None] & (offs_k < K)[None, :], other=0)
            acc = tl.dot(x, w.to(x.dtype), acc)
    if BLOCK_M == 1:
        acc = tl.sum(partial, axis=0)
        out_ptrs = out_ptr + pid_m * stride_om + offs_n
        mask = mask_n
    else:
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=mask)
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def launch(x: torch.Tensor, weight: KernelWeight, block_m: int, block_n: int, block_k: int, split_k: int,
           num_warps: int = 4, num_stages: int = 2, expand: bool = True) -> torch.Tensor:
    """x [M, K] in stored input order, contiguous → [M, N] in x's dtype."""
    m, k = x.shape
    n = weight.shape[0]
    block_k = max(block_k, weight.per_word)
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    out = (torch.empty(m, n, dtype=x.dtype, device=x.device) if split_k == 1
           else torch.zeros(m, n, dtype=torch.float32, device=x.device))
    zeros = weight.zeros if weight.zeros is not None else weight.scales
    grid = (triton.cdiv(n, block_n), split_k, m if block_m == 1 else triton.cdiv(m, block_m))
    packed_matmul_kernel[grid](
        x, weight.qweight, weight.scales, zeros, out, m, n, k, weight.n_groups, k_per_split,
        x.stride(0), out.stride(0),
        KIND=KINDS[weight.kind], BITS=weight.bits, HAS_ZEROS=weight.zeros is not None, GROUP=weight.group,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, ATOMIC=split_k > 1, EXPAND=expand,
        num_warps=num_warps, num_stages=num_stages)
    return out if out.dtype == x.dtype else out.to(x.dtype)

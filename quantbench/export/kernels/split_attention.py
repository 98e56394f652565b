"""One query token's attention split over the cache (as flash-decoding does), for a decode step on the GPU.

A decode step's attention has little work and little parallelism: one query row per head. Library kernels made for
prompts give each (batch, key/value head) one thread block that walks the whole cache (8B Llama, batch 1: 8 blocks
for 132 multiprocessors). Here the cache is cut into chunks: one program per (batch, key/value head, chunk) scores
the chunk for all the query heads that read that key/value head (`tl.dot` on a tile padded to 16 rows), keeps a
running softmax (max, sum, weighted values) in float32, and writes it out; a second kernel merges each head's chunks.
Positions the mask hides are never loaded, so a static cache costs what its filled part holds.

`split_decode_attention(query, key, value, mask, scale)` is the operator `quantbench::split_decode_attention`
(`torch.library.triton_op`), which torch.compile traces into its graph. `applies(...)` says which calls it takes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

BLOCK_L = 64  # cache positions a program scores per loop step
_MIN_ROWS = 16  # tl.dot's smallest tile


@triton.jit
def _split_attention_chunks(Q, K, V, Mask, Acc, Stats, length, chunk, scale,
                            stride_qb, stride_qh, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
                            stride_mb, stride_ml,
                            KV_HEADS: tl.constexpr, GROUPS: tl.constexpr, ROWS: tl.constexpr, DIM: tl.constexpr,
                            BLOCK: tl.constexpr, HAS_MASK: tl.constexpr):
    """Program (b·KV + h, c): the GROUPS query heads of key/value head h against chunk c of the cache →
    Acc [.., GROUPS, DIM] (exponential-weighted values), Stats [.., 2, GROUPS] (the largest score, in base 2, and the
    sum of the weights)."""
    head = tl.program_id(0)
    part = tl.program_id(1)
    b = head // KV_HEADS
    h = head % KV_HEADS
    rows = tl.arange(0, ROWS)
    dims = tl.arange(0, DIM)
    q = tl.load(Q + b * stride_qb + (h * GROUPS + rows[:, None]) * stride_qh + dims[None, :],
                mask=rows[:, None] < GROUPS, other=0.0)
    top = tl.full([ROWS], float("-inf"), tl.float32)
    total = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, DIM], tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    start = part * chunk
    end = tl.minimum(start + chunk, length)
    for offset in range(start, end, BLOCK):
        positions = offset + tl.arange(0, BLOCK)
        seen = positions < end
        if HAS_MASK:
            seen &= tl.load(Mask + b * stride_mb + positions * stride_ml, mask=seen, other=0) != 0
        k = tl.load(k_base + positions[:, None] * stride_kl + dims[None, :], mask=seen[:, None], other=0.0)
        scores = (tl.dot(q, tl.trans(k)) * (scale * 1.4426950408889634)).to(tl.float32)  # base 2: exp2 below;
        # float32 also where torch.compile hands the scale over as a float64 constant
        scores = tl.where(seen[None, :], scores, float("-inf"))
        new_top = tl.maximum(top, tl.max(scores, 1))
        shift = tl.where(new_top == float("-inf"), 0.0, new_top)  # a row that has seen nothing yet stays at zero
        weights = tl.exp2(scores - shift[:, None])
        decay = tl.exp2(top - shift)
        total = total * decay + tl.sum(weights, 1)
        v = tl.load(v_base + positions[:, None] * stride_vl + dims[None, :], mask=seen[:, None], other=0.0)
        acc = acc * decay[:, None] + tl.dot(weights.to(v.dtype), v)
        top = new_top
    slot = head * tl.num_programs(1) + part
    kept = rows < GROUPS
    tl.store(Acc + (slot * GROUPS + rows[:, None]) * DIM + dims[None, :], acc, mask=kept[:, None])
    tl.store(Stats + slot * 2 * GROUPS + rows, top, mask=kept)
    tl.store(Stats + slot * 2 * GROUPS + GROUPS + rows, total, mask=kept)


@triton.jit
def _split_attention_merge(Acc, Stats, Out, parts, GROUPS: tl.constexpr, DIM: tl.constexpr,
                           PARTS: tl.constexpr):
    """Program b·H + h·GROUPS + r (query head h·GROUPS + r): its chunks merged → Out [B, 1, H, DIM]."""
    query_head = tl.program_id(0)
    r = query_head % GROUPS
    chunks = tl.arange(0, PARTS)
    dims = tl.arange(0, DIM)
    present = chunks < parts
    slots = (query_head // GROUPS) * parts + chunks
    top = tl.load(Stats + slots * 2 * GROUPS + r, mask=present, other=float("-inf"))
    total = tl.load(Stats + slots * 2 * GROUPS + GROUPS + r, mask=present, other=0.0)
    overall = tl.max(top, 0)
    weight = tl.exp2(top - tl.where(overall == float("-inf"), 0.0, overall))
    denominator = tl.sum(weight * total, 0)
    denominator = tl.where(denominator == 0.0, 1.0, denominator)  # a head that sees no position gives zeros
    values = tl.load(Acc + (slots[:, None] * GROUPS + r) * DIM + dims[None, :], mask=present[:, None], other=0.0)
    merged = tl.sum(values * weight[:, None], 0) / denominator
    tl.store(Out + query_head * DIM + dims, merged.to(Out.dtype.element_ty))


def applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether `split_decode_attention` takes this call: query [B, H, 1, D] on grouped heads, key and value
    [B, KV, L, D] with unit stride along D, float16 or bfloat16, D a power of two from 16, and a boolean mask
    [1 or B, 1, 1, L] (or none)."""
    batch, heads, q_length, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    return (q_length == 1 and query.dtype in (torch.float16, torch.bfloat16) and key.dtype == query.dtype
            and value.dtype == query.dtype and heads % kv_heads == 0 and dim >= 16 and dim & (dim - 1) == 0
            and key.shape == value.shape == (batch, kv_heads, length, dim)
            and query.stride(-1) == key.stride(-1) == value.stride(-1) == 1
            and (mask is None or (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1:3] == (1, 1)
                                  and mask.shape[3] == length and mask.shape[0] in (1, batch))))


def chunk_length(batch_heads: int, length: int, processors: int) -> int:
    """Cache positions per program, whole BLOCK_L steps: up to two programs a multiprocessor."""
    blocks = triton.cdiv(length, BLOCK_L)
    parts = max(1, min(blocks, triton.cdiv(2 * processors, batch_heads)))
    return triton.cdiv(blocks, parts) * BLOCK_L


def _processors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # Triton's interpreter (tests): a few chunks, so that the merge is exercised


@triton_op("quantbench::split_decode_attention", mutates_args=())
def split_decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                           scale: float) -> torch.Tensor:
    """query [B, H, 1, D], key and value [B, KV, L, D], mask [1 or B, 1, 1, L] bool (True: attend) or None →
    [B, 1, H, D], as scaled_dot_product_attention with each key/value head repeated for its H / KV query heads."""
    batch, heads, _, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    chunk = chunk_length(batch * kv_heads, length, _processors(query.device))
    parts = triton.cdiv(length, chunk)
    acc = torch.empty(batch * kv_heads * parts, groups, dim, device=query.device, dtype=torch.float32)
    stats = torch.empty(batch * kv_heads * parts, 2, groups, device=query.device, dtype=torch.float32)
    out = torch.empty(batch, 1, heads, dim, device=query.device, dtype=query.dtype)
    mask_strides = (0, 0) if mask is None else (mask.stride(0) if mask.shape[0] > 1 else 0, mask.stride(3))
    wrap_triton(_split_attention_chunks)[(batch * kv_heads, parts)](
        query, key, value, key if mask is None else mask, acc, stats, length, chunk, scale,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), *mask_strides,
        KV_HEADS=kv_heads, GROUPS=groups, ROWS=max(_MIN_ROWS, triton.next_power_of_2(groups)), DIM=dim,
        BLOCK=BLOCK_L, HAS_MASK=mask is not None)
    wrap_triton(_split_attention_merge)[(batch * heads,)](acc, stats, out, parts, GROUPS=groups, DIM=dim,
                                                          PARTS=triton.next_power_of_2(parts))
    return out

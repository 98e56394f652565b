"""Triton source of `compensated_gram_` (see compensated_sum.py). Imported only where Triton is installed."""

import triton
import triton.language as tl


@triton.jit
def compensated_gram_kernel(x_ptr, total_ptr, carry_ptr, tile_rows_ptr, tile_cols_ptr, tokens, width, stride_x,
                            TILE: tl.constexpr, STEP: tl.constexpr, STEPS_PER_SUM: tl.constexpr,
                            UPCAST: tl.constexpr):
    """One TILE × TILE tile (row tile ≤ column tile) of total += xᵀx: STEPS_PER_SUM tensor-core dots of STEP tokens
    make one short float32 sum, Kahan-added to the tile held in registers; the tile and its carry are stored at
    both (i, j) and (j, i)."""
    pid = tl.program_id(0)
    row_tile = tl.load(tile_rows_ptr + pid)
    col_tile = tl.load(tile_cols_ptr + pid)
    rows = row_tile * TILE + tl.arange(0, TILE)
    cols = col_tile * TILE + tl.arange(0, TILE)
    steps = tl.arange(0, STEP)
    row_in = rows < width
    col_in = cols < width
    inside = row_in[:, None] & col_in[None, :]
    here = rows[:, None].to(tl.int64) * width + cols[None, :]
    total = tl.load(total_ptr + here, mask=inside, other=0.0)
    carry = tl.load(carry_ptr + here, mask=inside, other=0.0)
    for start in range(0, tokens, STEP * STEPS_PER_SUM):
        short_sum = tl.zeros((TILE, TILE), dtype=tl.float32)
        for step in tl.static_range(STEPS_PER_SUM):
            k = start + step * STEP + steps
            k_in = k < tokens
            k_offsets = k.to(tl.int64) * stride_x
            a = tl.load(x_ptr + k_offsets[None, :] + rows[:, None], mask=row_in[:, None] & k_in[None, :], other=0.0)
            b = tl.load(x_ptr + k_offsets[:, None] + cols[None, :], mask=k_in[:, None] & col_in[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            short_sum = tl.dot(a, b, short_sum)
        y = short_sum - carry
        t = total + y
        carry = (t - total) - y
        total = t
    tl.store(total_ptr + here, total, mask=inside)
    tl.store(carry_ptr + here, carry, mask=inside)
    if row_tile != col_tile:
        mirrored = cols[None, :].to(tl.int64) * width + rows[:, None]
        tl.store(total_ptr + mirrored, total, mask=inside)
        tl.store(carry_ptr + mirrored, carry, mask=inside)

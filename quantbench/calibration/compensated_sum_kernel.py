"""Triton source of `kahan_add_` (see compensated_sum.py). Imported only where Triton is installed."""

import triton
import triton.language as tl


@triton.jit
def kahan_add_kernel(total_ptr, carry_ptr, term_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    total = tl.load(total_ptr + offsets, mask=mask)
    y = tl.load(term_ptr + offsets, mask=mask) - tl.load(carry_ptr + offsets, mask=mask)
    t = total + y
    tl.store(carry_ptr + offsets, (t - total) - y, mask=mask)
    tl.store(total_ptr + offsets, t, mask=mask)

"""Triton kernels of a sampled token on CUDA (`quantbench.sampling`), a few launches where torch's operators take
some forty, with no host sync, so a CUDA graph captures them.

`keyed_draw`: each row's token, the argmax of its scores at or above its floor plus the Gumbel noise of its keyed
uniforms (`Draws`), the keys hashed in the kernel. `refine_nucleus_floors`: the least score of each nucleus that the
candidates did not settle, found by bisection over the scores' order (32 passes over the row at most); a row the
candidates settled returns at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

DRAW_BLOCK = 2048  # vocabulary entries a program of keyed_draw noises
FLOOR_BLOCK = 2048  # entries a pass of the nucleus bisection reads at a time


@triton.jit
def _keyed_draw_kernel(scores, stride, floors, keys, counts, best_scores, best_entries, vocabulary, parts,
                       BLOCK: tl.constexpr):
    row = tl.program_id(0)
    part = tl.program_id(1)
    # The row's token key: SplitMix64 of its prompt's key plus its count of tokens times the golden step.
    z = tl.load(keys + row).to(tl.uint64, bitcast=True) + tl.load(counts + row).to(tl.uint64, bitcast=True) \
        * 0x9E3779B97F4A7C15 + 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    high = ((z ^ (z >> 31)) >> 32).to(tl.uint32)
    entries = part * BLOCK + tl.arange(0, BLOCK)
    inside = entries < vocabulary
    # MurmurHash3's finalizer of the high word plus (entry + 1) golden 32-bit steps: the entry's uniform.
    w = high + (entries + 1).to(tl.uint32) * 0x9E3779B9
    w = (w ^ (w >> 16)) * 0x85EBCA6B
    w = (w ^ (w >> 13)) * 0xC2B2AE35
    w = w ^ (w >> 16)
    uniform = ((w >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2^-23
    score = tl.load(scores + row * stride + entries, mask=inside, other=float("-inf"))
    noisy = score - tl.log(-tl.log(uniform))
    noisy = tl.where(inside & (score >= tl.load(floors + row)), noisy, float("-inf"))
    tl.store(best_scores + row * parts + part, tl.max(noisy, 0))
    tl.store(best_entries + row * parts + part, part * BLOCK + tl.argmax(noisy, 0))


def keyed_draw(scores: torch.Tensor, floors: torch.Tensor, keys: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """int64 [rows, 1]: the argmax over each row's entries with scores at or above its floor ([rows, 1]) of the score
    plus −log(−log(u)), u its uniform for `keys` and `counts` (int64 [rows], as `Draws` holds them; not moved on
    here)."""
    rows, vocabulary = scores.shape
    parts = triton.cdiv(vocabulary, DRAW_BLOCK)
    best_scores = torch.empty(rows, parts, dtype=torch.float32, device=scores.device)
    best_entries = torch.empty(rows, parts, dtype=torch.int32, device=scores.device)
    _keyed_draw_kernel[(rows, parts)](scores, scores.stride(0), floors.contiguous(), keys, counts, best_scores,
                                      best_entries, vocabulary, parts, BLOCK=DRAW_BLOCK)
    return best_entries.gather(-1, best_scores.argmax(-1, keepdim=True)).long()


@triton.jit
def _ordered(bits):
    """A float32's bits (int64 of its int32) as an integer in the order of the floats."""
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _nucleus_floor_kernel(scores, stride, totals, floors, settled, top_p, vocabulary, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    if tl.load(settled + row) == 0:
        total = tl.load(totals + row)
        at = row * stride
        # high: the candidates' least score, whose mass above stays below top_p; low: below every score.
        high = _ordered(tl.load(floors + row).to(tl.int32, bitcast=True).to(tl.int64))
        low = high
        for start in range(0, vocabulary, BLOCK):
            entries = start + tl.arange(0, BLOCK)
            bits = tl.load(scores + at + entries, mask=entries < vocabulary, other=0.0).to(tl.int32, bitcast=True)
            low = tl.minimum(low, tl.min(_ordered(bits.to(tl.int64)), 0))
        low = low - 1
        while high - low > 1:  # the least key whose mass strictly above stays below top_p lies in (low, high]
            middle = low + (high - low) // 2
            mass = 0.0
            for start in range(0, vocabulary, BLOCK):
                entries = start + tl.arange(0, BLOCK)
                score = tl.load(scores + at + entries, mask=entries < vocabulary, other=float("-inf"))
                above = _ordered(score.to(tl.int32, bitcast=True).to(tl.int64)) > middle
                mass += tl.sum(tl.where(above, tl.exp(score - total), 0.0), 0)
            if mass < top_p:
                high = middle
            else:
                low = middle
        bits = tl.where(high < 0, high ^ 0x7FFFFFFF, high).to(tl.int32)
        tl.store(floors + row, bits.to(tl.float32, bitcast=True))


def refine_nucleus_floors(scores: torch.Tensor, totals: torch.Tensor, floors: torch.Tensor, settled: torch.Tensor,
                          top_p: float) -> None:
    """In place: for each row not `settled`, `floors` ([rows, 1] float32, there the least of the candidates, all in
    the nucleus) becomes the least key whose mass of scores strictly above (softmax with log-sum `totals`) stays
    below `top_p`; tokens at or above it are the nucleus."""
    rows, vocabulary = scores.shape
    _nucleus_floor_kernel[(rows,)](scores, scores.stride(0), totals.contiguous(), floors, settled.to(torch.int8),
                                   top_p, vocabulary, BLOCK=FLOOR_BLOCK)

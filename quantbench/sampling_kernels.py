"""Triton kernels of a sampled token on CUDA (`quantbench.sampling`): a few launches where torch's operators take
some forty, with no sort and no host sync, so a CUDA graph captures them.

`keyed_draw`: each row's token, the argmax of its scores at or above its floor plus the Gumbel noise of its keyed
uniforms (`Draws`), the keys hashed in the kernel; rows × blocks of the vocabulary in parallel.

`settle_nucleus_draws`: top-p without finding the nucleus first. The token a draw over the nucleus gives is the
argmax of the noisy scores among the nucleus; the argmax among all allowed tokens is it where that token is in the
nucleus (the probability of the tokens strictly above it is below top_p). Where it is not, neither is any token
scored at or below it, so the argmax is taken again among the tokens above it, until one is in. The first round
runs as the draw does, rows × blocks of the vocabulary in parallel; a candidate is out with a probability of at
most 1 − top_p, so the rows it leaves unsettled are few, and those go on in rounds of one program a row, each
skipping the blocks with no score above the last candidate. The log-sum of the allowed tokens' exponentials that
the probabilities need comes from the draw's kernel, a partial sum per block.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

DRAW_BLOCK = 2048  # vocabulary entries a program of keyed_draw noises
ROUND_BLOCK = 4096  # entries a round of settle_nucleus_draws reads at a time
ROUND_WARPS = 8


@triton.jit
def _token_word(keys, counts, row):
    """The high word of SplitMix64 of the row's prompt key plus its count of tokens times the golden step."""
    z = tl.load(keys + row).to(tl.uint64, bitcast=True) + tl.load(counts + row).to(tl.uint64, bitcast=True) \
        * 0x9E3779B97F4A7C15 + 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return ((z ^ (z >> 31)) >> 32).to(tl.uint32)


@triton.jit
def _gumbel(word, entries):
    """−log(−log(u)) for the entries' uniforms: MurmurHash3's finalizer of the word plus (entry + 1) golden 32-bit
    steps, its top 23 bits + ½ over 2^23."""
    w = word + (entries + 1).to(tl.uint32) * 0x9E3779B9
    w = (w ^ (w >> 16)) * 0x85EBCA6B
    w = (w ^ (w >> 13)) * 0xC2B2AE35
    w = w ^ (w >> 16)
    uniform = ((w >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2^-23
    return -tl.log(-tl.log(uniform))


@triton.jit
def _keyed_draw_kernel(scores, stride, floors, keys, counts, best_scores, best_entries, peaks, sums, vocabulary,
                       parts, BLOCK: tl.constexpr, SUMS: tl.constexpr):
    row = tl.program_id(0)
    part = tl.program_id(1)
    entries = part * BLOCK + tl.arange(0, BLOCK)
    score = tl.load(scores + row * stride + entries, mask=entries < vocabulary, other=float("-inf"))
    allowed = score >= tl.load(floors + row)  # entries past the vocabulary load -inf: never drawn, nothing summed
    noisy = tl.where(allowed, score + _gumbel(_token_word(keys, counts, row), entries), float("-inf"))
    tl.store(best_scores + row * parts + part, tl.max(noisy, 0))
    tl.store(best_entries + row * parts + part, part * BLOCK + tl.argmax(noisy, 0))
    if SUMS:  # the block's share of the log-sum: its peak, and the sum of exponentials below it
        kept = tl.where(allowed, score, float("-inf"))
        peak = tl.max(kept, 0)
        tl.store(peaks + row * parts + part, peak)  # -inf where the block keeps nothing: its sum is 0
        tl.store(sums + row * parts + part, tl.sum(tl.exp(kept - tl.where(peak > float("-inf"), peak, 0.0)), 0))


def keyed_draw(scores: torch.Tensor, floors: torch.Tensor, keys: torch.Tensor, counts: torch.Tensor,
               log_total: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """int64 [rows, 1]: the argmax over each row's entries with scores at or above its floor ([rows, 1]) of the score
    plus −log(−log(u)), u its uniform for `keys` and `counts` (int64 [rows], as `Draws` holds them; not moved on
    here); with `log_total`, also float32 [rows, 1]: the log of the sum of those entries' exp(score)."""
    rows, vocabulary = scores.shape
    parts = triton.cdiv(vocabulary, DRAW_BLOCK)
    best_scores = torch.empty(rows, parts, dtype=torch.float32, device=scores.device)
    best_entries = torch.empty(rows, parts, dtype=torch.int32, device=scores.device)
    peaks = torch.empty(rows, parts if log_total else 1, dtype=torch.float32, device=scores.device)
    sums = torch.empty_like(peaks)
    _keyed_draw_kernel[(rows, parts)](scores, scores.stride(0), floors.contiguous(), keys, counts, best_scores,
                                      best_entries, peaks, sums, vocabulary, parts, BLOCK=DRAW_BLOCK, SUMS=log_total)
    chosen = best_entries.gather(-1, best_scores.argmax(-1, keepdim=True)).long()
    if not log_total:
        return chosen, None
    top = peaks.amax(-1, keepdim=True)
    return chosen, top + (sums * torch.exp(peaks - top)).sum(-1, keepdim=True).log()


@triton.jit
def _nucleus_round_kernel(scores, stride, totals, keys, counts, chosen, masses, best_scores, best_entries,
                          vocabulary, parts, BLOCK: tl.constexpr):
    """One round over a block of a row: the mass of its entries scored above the row's candidate, and the argmax
    of their noisy scores."""
    row = tl.program_id(0)
    part = tl.program_id(1)
    at = scores + row * stride
    entries = part * BLOCK + tl.arange(0, BLOCK)
    score = tl.load(at + entries, mask=entries < vocabulary, other=float("-inf"))
    above = score > tl.load(at + tl.load(chosen + row))
    tl.store(masses + row * parts + part, tl.sum(tl.where(above, tl.exp(score - tl.load(totals + row)), 0.0), 0))
    noisy = tl.where(above, score + _gumbel(_token_word(keys, counts, row), entries), float("-inf"))
    tl.store(best_scores + row * parts + part, tl.max(noisy, 0))
    tl.store(best_entries + row * parts + part, part * BLOCK + tl.argmax(noisy, 0))


@triton.jit
def _nucleus_rounds_kernel(scores, stride, totals, keys, counts, chosen, settled_rows, top_p, vocabulary,
                           BLOCK: tl.constexpr):
    row = tl.program_id(0)
    at = scores + row * stride
    word = _token_word(keys, counts, row)
    total = tl.load(totals + row)
    lanes = tl.arange(0, BLOCK)
    candidate = tl.load(chosen + row)
    settled = tl.load(settled_rows + row).to(tl.int32)
    while settled == 0:  # ends: a round that does not settle moves to a candidate scored strictly above
        bound = tl.load(at + candidate)  # at or above the floor: so is every score above it
        mass = tl.zeros([BLOCK], dtype=tl.float32)
        best = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        where = tl.zeros([BLOCK], dtype=tl.int64) + vocabulary
        for start in range(0, vocabulary, BLOCK):
            entries = start + lanes
            score = tl.load(at + entries, mask=entries < vocabulary, other=float("-inf"))
            if tl.max(score, 0) > bound:
                above = score > bound
                mass += tl.where(above, tl.exp(score - total), 0.0)
                noisy = tl.where(above, score + _gumbel(word, entries), float("-inf"))
                better = noisy > best  # a lane keeps its first best entry
                best = tl.where(better, noisy, best)
                where = tl.where(better, entries.to(tl.int64), where)
        if tl.sum(mass, 0) < top_p:
            settled = 1
        else:
            top = tl.max(best, 0)
            candidate = tl.min(tl.where(best == top, where, vocabulary), 0)
    tl.store(chosen + row, candidate)


def settle_nucleus_draws(scores: torch.Tensor, totals: torch.Tensor, keys: torch.Tensor, counts: torch.Tensor,
                         chosen: torch.Tensor, top_p: float) -> torch.Tensor:
    """In place: each row's `chosen` token (int64 [rows, 1], from `keyed_draw` over the tokens allowed) becomes
    its draw over the nucleus: the tokens whose probability of tokens strictly above them (softmax with log-sums
    `totals` [rows, 1] over those allowed) is below `top_p`. Returns bool [rows, 1]: the rows the first round
    settled."""
    rows, vocabulary = scores.shape
    parts = triton.cdiv(vocabulary, DRAW_BLOCK)
    masses = torch.empty(rows, parts, dtype=torch.float32, device=scores.device)
    best_scores = torch.empty_like(masses)
    best_entries = torch.empty(rows, parts, dtype=torch.int32, device=scores.device)
    totals = totals.contiguous()
    _nucleus_round_kernel[(rows, parts)](scores, scores.stride(0), totals, keys, counts, chosen, masses, best_scores,
                                         best_entries, vocabulary, parts, BLOCK=DRAW_BLOCK)
    settled = masses.sum(-1, keepdim=True) < top_p
    chosen.copy_(torch.where(settled, chosen, best_entries.gather(-1, best_scores.argmax(-1, keepdim=True)).long()))
    launch = {} if os.environ.get("TRITON_INTERPRET") == "1" else {"num_warps": ROUND_WARPS}
    _nucleus_rounds_kernel[(rows,)](scores, scores.stride(0), totals, keys, counts, chosen, settled, top_p,
                                    vocabulary, BLOCK=ROUND_BLOCK, **launch)
    return settled

"""Triton kernels of a sampled token on CUDA (`quantbench.sampling`): a few launches where torch's operators take
some forty, with no sort and no host sync, so a CUDA graph captures them.

`keyed_draw`: each row's token, the argmax of its scores at or above its floor plus the Gumbel noise of its keyed
uniforms (`Draws`), the keys hashed in the kernel; rows × blocks of the vocabulary in parallel.

`nucleus_draw`: top-p without finding the nucleus first. The token a draw over the nucleus gives is the argmax of
the noisy scores among the nucleus; the argmax among all allowed tokens is it where that token is in the nucleus
(the probability of the tokens strictly above it is below top_p). Where it is not, neither is any token scored at
or below it, so the argmax is taken again among the tokens above it, until one is in. Three launches: the draw
over rows × blocks, which also sums each block's exponentials for the softmax's log-sum; the first round over rows
× blocks, each program first combining its row's blocks into the candidate and the log-sum; then one program a
row, which settles the rows whose candidate is in and takes the others on in rounds, each skipping the blocks
with no score above the last candidate. A candidate is out with a probability of at most 1 − top_p, so those rows
are few.

`topk_floors`: each row's k-th largest score, top-k's floor, without a sort: each block's k-th largest found bit by
bit in its registers, and the keys at or above it kept; then each row's k-th among its blocks' kept keys.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

DRAW_BLOCK = 2048  # vocabulary entries a program of the draw and of the first round reads
ROUND_BLOCK = 4096  # entries a program of the later rounds reads at a time
ROUND_WARPS = 8
TOPK_KEPT_MAX = 256  # the largest k whose floors the kernels find (the keys a block keeps)
TOPK_CANDIDATES_MAX = 8192  # the most keys a row's floor is found among in one program


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
def _store_block_best(noisy, best_scores, best_entries, row, parts, part, BLOCK: tl.constexpr):
    """A block's largest noisy score and its entry (the first where several are)."""
    tl.store(best_scores + row * parts + part, tl.max(noisy, 0))
    tl.store(best_entries + row * parts + part, part * BLOCK + tl.argmax(noisy, 0))


@triton.jit
def _keyed_draw_kernel(scores, stride, floors, keys, counts, best_scores, best_entries, peaks, sums, vocabulary,
                       parts, BLOCK: tl.constexpr, SUMS: tl.constexpr):
    row = tl.program_id(0)
    part = tl.program_id(1)
    entries = part * BLOCK + tl.arange(0, BLOCK)
    score = tl.load(scores + row * stride + entries, mask=entries < vocabulary, other=float("-inf"))
    allowed = score >= tl.load(floors + row)  # entries past the vocabulary load -inf: never drawn, nothing summed
    noisy = tl.where(allowed, score + _gumbel(_token_word(keys, counts, row), entries), float("-inf"))
    _store_block_best(noisy, best_scores, best_entries, row, parts, part, BLOCK)
    if SUMS:  # the block's share of the log-sum: its peak, and the sum of exponentials below it
        kept = tl.where(allowed, score, float("-inf"))
        peak = tl.max(kept, 0)
        tl.store(peaks + row * parts + part, peak)  # -inf where the block keeps nothing: its sum is 0
        tl.store(sums + row * parts + part, tl.sum(tl.exp(kept - tl.where(peak > float("-inf"), peak, 0.0)), 0))


@triton.jit
def _first_of_best(best_scores, best_entries, row, parts, vocabulary, PARTS: tl.constexpr):
    """The row's entry of the largest of its blocks' best scores (the first where several are)."""
    offsets = tl.arange(0, PARTS)
    inside = offsets < parts
    best = tl.load(best_scores + row * parts + offsets, mask=inside, other=float("-inf"))
    where = tl.load(best_entries + row * parts + offsets, mask=inside, other=vocabulary)
    return tl.min(tl.where(inside & (best == tl.max(best, 0)), where, vocabulary), 0).to(tl.int64)


def keyed_draw(scores: torch.Tensor, floors: torch.Tensor, keys: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """int64 [rows, 1]: the argmax over each row's entries with scores at or above its floor ([rows, 1]) of the score
    plus −log(−log(u)), u its uniform for `keys` and `counts` (int64 [rows], as `Draws` holds them; not moved on
    here)."""
    best_scores, best_entries, _, _ = _draw_blocks(scores, floors, keys, counts, sums=False)
    return best_entries.gather(-1, best_scores.argmax(-1, keepdim=True)).long()


def _draw_blocks(scores, floors, keys, counts, sums: bool):
    """Per row and block of DRAW_BLOCK entries: the best noisy score among the kept entries and its entry, and with
    `sums` the block's peak kept score and its sum of exp(score − peak) over the kept entries."""
    rows, vocabulary = scores.shape
    parts = triton.cdiv(vocabulary, DRAW_BLOCK)
    best_scores = torch.empty(rows, parts, dtype=torch.float32, device=scores.device)
    best_entries = torch.empty(rows, parts, dtype=torch.int32, device=scores.device)
    peaks = torch.empty(rows, parts if sums else 1, dtype=torch.float32, device=scores.device)
    block_sums = torch.empty_like(peaks)
    _keyed_draw_kernel[(rows, parts)](scores, scores.stride(0), floors.contiguous(), keys, counts, best_scores,
                                      best_entries, peaks, block_sums, vocabulary, parts, BLOCK=DRAW_BLOCK, SUMS=sums)
    return best_scores, best_entries, peaks, block_sums


@triton.jit
def _first_round_kernel(scores, stride, keys, counts, drawn_scores, drawn_entries, peaks, sums, totals, masses,
                        best_scores, best_entries, vocabulary, parts, BLOCK: tl.constexpr, PARTS: tl.constexpr):
    """A block's part of the first round: the mass of its entries scored above the row's drawn token, and the
    argmax of their noisy scores."""
    row = tl.program_id(0)
    part = tl.program_id(1)
    offsets = tl.arange(0, PARTS)
    inside = offsets < parts
    block_peaks = tl.load(peaks + row * parts + offsets, mask=inside, other=float("-inf"))
    top = tl.max(block_peaks, 0)
    block_sums = tl.load(sums + row * parts + offsets, mask=inside, other=0.0)
    total = top + tl.log(tl.sum(block_sums * tl.exp(block_peaks - top), 0))
    at = scores + row * stride
    bound = tl.load(at + _first_of_best(drawn_scores, drawn_entries, row, parts, vocabulary, PARTS))
    entries = part * BLOCK + tl.arange(0, BLOCK)
    score = tl.load(at + entries, mask=entries < vocabulary, other=float("-inf"))
    above = score > bound
    tl.store(masses + row * parts + part, tl.sum(tl.where(above, tl.exp(score - total), 0.0), 0))
    noisy = tl.where(above, score + _gumbel(_token_word(keys, counts, row), entries), float("-inf"))
    _store_block_best(noisy, best_scores, best_entries, row, parts, part, BLOCK)
    if part == 0:
        tl.store(totals + row, total)


@triton.jit
def _nucleus_rounds_kernel(scores, stride, keys, counts, drawn_scores, drawn_entries, totals, masses, best_scores,
                           best_entries, chosen, first_settled, top_p, vocabulary, parts, BLOCK: tl.constexpr,
                           PARTS: tl.constexpr):
    row = tl.program_id(0)
    at = scores + row * stride
    word = _token_word(keys, counts, row)
    total = tl.load(totals + row)
    lanes = tl.arange(0, BLOCK)
    offsets = tl.arange(0, PARTS)
    first_mass = tl.sum(tl.load(masses + row * parts + offsets, mask=offsets < parts, other=0.0), 0)
    settled = (first_mass < top_p).to(tl.int32)
    tl.store(first_settled + row, settled.to(tl.int8))
    if settled == 1:
        candidate = _first_of_best(drawn_scores, drawn_entries, row, parts, vocabulary, PARTS)
    else:
        candidate = _first_of_best(best_scores, best_entries, row, parts, vocabulary, PARTS)
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


@triton.jit
def _order_keys(score):
    """uint32 keys in the order of the float32 scores: the sign bit set on non-negatives, every bit flipped on
    negatives."""
    bits = score.to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) == 1, ~bits, bits | 0x80000000)


@triton.jit
def _score_of_key(key):
    """The float32 score whose `_order_keys` key this is."""
    return tl.where((key >> 31) == 1, key & 0x7FFFFFFF, ~key).to(tl.float32, bitcast=True)


@triton.jit
def _kth_largest_key(keys, k):
    """The k-th largest of the keys (k ≤ their count), bit by bit from the top: the largest key T with at least k
    keys at or above it."""
    found = tl.zeros([], dtype=tl.uint32)
    for bit in tl.static_range(31, -1, -1):
        trial = found | (tl.full([], 1, tl.uint32) << bit)
        if tl.sum((keys >= trial).to(tl.int32), 0) >= k:
            found = trial
    return found


@triton.jit
def _block_candidates_kernel(scores, stride, candidates, vocabulary, parts, k, BLOCK: tl.constexpr,
                             KEPT: tl.constexpr):
    """A block's k largest scores' keys (its k-th's ties after those above it, up to KEPT ≥ k in all), the other
    places key 0, below every score's."""
    row = tl.program_id(0)
    part = tl.program_id(1)
    entries = part * BLOCK + tl.arange(0, BLOCK)
    score = tl.load(scores + row * stride + entries, mask=entries < vocabulary, other=0.0)
    keys = tl.where(entries < vocabulary, _order_keys(score), 0)
    kth = _kth_largest_key(keys, k)
    above = keys > kth
    tied = keys == kth
    count_above = tl.sum(above.to(tl.int32), 0)
    places = tl.where(above, tl.cumsum(above.to(tl.int32), 0) - 1, count_above + tl.cumsum(tied.to(tl.int32), 0) - 1)
    out = candidates + (row * parts + part) * KEPT
    tl.store(out + places, keys.to(tl.int32, bitcast=True), mask=(above | tied) & (places < KEPT))
    slots = tl.arange(0, KEPT)
    tl.store(out + slots, tl.zeros([KEPT], dtype=tl.int32), mask=slots >= count_above + tl.sum(tied.to(tl.int32), 0))


@triton.jit
def _topk_floor_kernel(candidates, floors, k, count, CANDIDATES: tl.constexpr):
    row = tl.program_id(0)
    offsets = tl.arange(0, CANDIDATES)
    keys = tl.load(candidates + row * count + offsets, mask=offsets < count, other=0).to(tl.uint32, bitcast=True)
    tl.store(floors + row, _score_of_key(_kth_largest_key(keys, k)))


def topk_floors(scores: torch.Tensor, k: int) -> torch.Tensor:
    """float32 [rows, 1]: each row's k-th largest score (`scores.topk(k).values[:, -1:]`) without a sort, in two
    launches: each block of DRAW_BLOCK entries finds its k-th largest bit by bit and keeps the keys at or above it
    (every one of the row's k largest is among its block's); then each row's k-th among those. For k up to
    `TOPK_KEPT_MAX` and at most `TOPK_CANDIDATES_MAX` kept a row (`topk_fits`)."""
    rows, vocabulary = scores.shape
    parts = triton.cdiv(vocabulary, DRAW_BLOCK)
    kept = triton.next_power_of_2(k)
    candidates = torch.empty(rows, parts * kept, dtype=torch.int32, device=scores.device)
    _block_candidates_kernel[(rows, parts)](scores, scores.stride(0), candidates, vocabulary, parts, k,
                                            BLOCK=DRAW_BLOCK, KEPT=kept)
    floors = torch.empty(rows, 1, dtype=torch.float32, device=scores.device)
    _topk_floor_kernel[(rows,)](candidates, floors, k, parts * kept,
                                CANDIDATES=triton.next_power_of_2(parts * kept))
    return floors


def topk_fits(k: int, vocabulary: int) -> bool:
    """Whether `topk_floors` takes top-k `k` of a vocabulary of this size."""
    return 0 < k <= TOPK_KEPT_MAX and triton.cdiv(vocabulary, DRAW_BLOCK) * triton.next_power_of_2(k) \
        <= TOPK_CANDIDATES_MAX


def nucleus_draw(scores: torch.Tensor, floors: torch.Tensor, keys: torch.Tensor, counts: torch.Tensor,
                 top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 [rows, 1]: each row's draw over its nucleus: among its entries scored at or above its floor, those
    whose probability of entries strictly above them (softmax over those entries) is below `top_p`; the noise as
    `keyed_draw`'s. Also bool [rows]: the rows whose first candidate was in the nucleus."""
    rows, vocabulary = scores.shape
    parts = triton.cdiv(vocabulary, DRAW_BLOCK)
    PARTS = triton.next_power_of_2(parts)
    drawn_scores, drawn_entries, peaks, sums = _draw_blocks(scores, floors, keys, counts, sums=True)
    masses, best_scores = torch.empty_like(drawn_scores), torch.empty_like(drawn_scores)
    best_entries = torch.empty_like(drawn_entries)
    totals = torch.empty(rows, dtype=torch.float32, device=scores.device)
    _first_round_kernel[(rows, parts)](scores, scores.stride(0), keys, counts, drawn_scores, drawn_entries, peaks,
                                       sums, totals, masses, best_scores, best_entries, vocabulary, parts,
                                       BLOCK=DRAW_BLOCK, PARTS=PARTS)
    chosen = torch.empty(rows, 1, dtype=torch.int64, device=scores.device)
    first_settled = torch.empty(rows, dtype=torch.int8, device=scores.device)
    launch = {} if os.environ.get("TRITON_INTERPRET") == "1" else {"num_warps": ROUND_WARPS}
    _nucleus_rounds_kernel[(rows,)](scores, scores.stride(0), keys, counts, drawn_scores, drawn_entries, totals,
                                    masses, best_scores, best_entries, chosen, first_settled, top_p, vocabulary,
                                    parts, BLOCK=ROUND_BLOCK, PARTS=PARTS, **launch)
    return chosen, first_settled.bool()

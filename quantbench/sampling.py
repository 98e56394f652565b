"""How a generated token is chosen: the argmax, or a draw from the softmax of the logits over a temperature, cut to
the `top_k` largest and the nucleus of mass `top_p` (`Sampling`, `next_tokens`).

A draw's randomness is a function of the run's seed, the prompt's number and the token's number within its answer
(`Draws`): no generator state is carried from one row or one step to the next. A prompt therefore draws the same
noise alone or in a batch, in whichever row it decodes, whenever it takes that row, on the CPU or in a CUDA graph,
and in a run resumed after a crash. The noise comes from counters hashed by integer arithmetic on the device
(SplitMix64's mixer for each prompt and token, MurmurHash3's 32-bit finalizer across the vocabulary), so a CUDA
graph captures it like any other step of the decode.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from quantbench.errors import QuantbenchError


@dataclass(frozen=True)
class Sampling:
    """How a token is chosen from the logits: the argmax at temperature 0, else a draw from softmax(logits /
    temperature) over the `top_k` largest (0: all) and the fewest largest whose probabilities reach `top_p`.
    The draw is seeded by `seed` (None: a fresh seed, kept in the result so the text can be drawn again)."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise QuantbenchError(f"temperature {self.temperature}: use 0 (greedy) or more")
        if self.top_k < 0:
            raise QuantbenchError(f"top_k {self.top_k}: use 0 (every token) or more")
        if not 0 < self.top_p <= 1:
            raise QuantbenchError(f"top_p {self.top_p}: use a probability in (0, 1]")
        if self.temperature == 0 and (self.top_k or self.top_p < 1):
            raise QuantbenchError("top_k and top_p cut what is sampled: set a temperature above 0 to sample")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def seeded(self) -> Sampling:
        """This sampling with its seed drawn if it had none."""
        if self.greedy or self.seed is not None:
            return self
        return dataclasses.replace(self, seed=secrets.randbits(63))

    def to_dict(self) -> dict:
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "seed": self.seed}


_WORD = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's step: 2^64 over the golden ratio, odd
_MIX_1, _MIX_2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_GOLDEN_32, _FMIX_1, _FMIX_2 = 0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35


def splitmix(value: int) -> int:
    """SplitMix64's output for the state `value` + its step, on unsigned 64-bit words (the reference for
    `_splitmix_tensor`)."""
    z = (value + _GOLDEN) & _WORD
    z = ((z ^ (z >> 30)) * _MIX_1) & _WORD
    z = ((z ^ (z >> 27)) * _MIX_2) & _WORD
    return z ^ (z >> 31)


def fmix32(value: int) -> int:
    """MurmurHash3's finalizer on an unsigned 32-bit word (the reference for `_fmix32_tensor`)."""
    z = value & 0xFFFFFFFF
    z = ((z ^ (z >> 16)) * _FMIX_1) & 0xFFFFFFFF
    z = ((z ^ (z >> 13)) * _FMIX_2) & 0xFFFFFFFF
    return z ^ (z >> 16)


def _signed(value: int, bits: int) -> int:
    """The two's complement integer of an unsigned `bits`-bit word (torch's int64 and int32 hold those)."""
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def _shifted_right(z: torch.Tensor, by: int, bits: int) -> torch.Tensor:
    """The logical right shift of signed words (torch's shift copies the sign bit)."""
    return (z >> by) & ((1 << (bits - by)) - 1)


def _splitmix_tensor(z: torch.Tensor) -> torch.Tensor:
    """`splitmix` of each int64 (its bits as an unsigned word; products wrap as they do on unsigned words)."""
    z = z + _signed(_GOLDEN, 64)
    z = (z ^ _shifted_right(z, 30, 64)) * _signed(_MIX_1, 64)
    z = (z ^ _shifted_right(z, 27, 64)) * _signed(_MIX_2, 64)
    return z ^ _shifted_right(z, 31, 64)


def _fmix32_tensor(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _shifted_right(z, 16, 32)) * _signed(_FMIX_1, 32)
    z = (z ^ _shifted_right(z, 13, 32)) * _signed(_FMIX_2, 32)
    return z ^ _shifted_right(z, 16, 32)


def prompt_key(seed: int, number: int) -> int:
    """The signed 64-bit key of prompt `number`'s draws in a run seeded `seed`."""
    return _signed(splitmix(seed + splitmix(number)), 64)


class Draws:
    """The uniform noise of each row's draws. Row r's token t (t = 0: the prefill's) is keyed by k = splitmix(key_r +
    t · step), and its uniform for vocabulary entry v is (fmix32(k's high word + (v + 1) · step₃₂) without its low
    9 bits + ½) / 2²³: in (0, 1), and exact in float32. `keys` and `counts` (each row's next token's number) are
    tensors on the device, which a row's handing over sets and each draw moves on in place (a CUDA graph replays
    them)."""

    def __init__(self, seed: int, keys: torch.Tensor, counts: torch.Tensor):
        self.seed, self.keys, self.counts = seed, keys, counts

    @classmethod
    def of(cls, sampling: Sampling, numbers: Sequence[int], device: torch.device) -> Draws | None:
        """The draws of prompts `numbers` in their rows; None where `sampling` is greedy."""
        if sampling.greedy:
            return None
        keys = torch.tensor([prompt_key(sampling.seed, number) for number in numbers], dtype=torch.int64)
        return cls(sampling.seed, keys.to(device), torch.zeros(len(numbers), dtype=torch.int64, device=device))

    def start(self, row: int, number: int) -> None:
        """Row `row` now draws prompt `number`'s tokens, from its first."""
        self.keys[row] = prompt_key(self.seed, number)
        self.counts[row] = 0

    def __getitem__(self, rows: list[int]) -> Draws:
        """A copy of these rows' draws (their counts are not moved on here)."""
        return Draws(self.seed, self.keys[rows], self.counts[rows])

    def uniform(self, entries: torch.Tensor) -> torch.Tensor:
        """float32 [rows, n]: each row's uniforms for its next token at vocabulary `entries` ([n] or [rows, n]
        token ids); the counts move on."""
        keys = _splitmix_tensor(self.keys + self.counts * _signed(_GOLDEN, 64))
        self.counts.add_(1)
        high = (keys >> 32).to(torch.int32)  # the sign copied in: the high word as a signed int32
        steps = (entries.to(torch.int32) + 1) * _signed(_GOLDEN_32, 32)
        words = _fmix32_tensor(high[:, None] + steps)
        return (_shifted_right(words, 9, 32).float() + 0.5) * 2.0 ** -23


def next_tokens(logits: torch.Tensor, sampling: Sampling, draws: Draws | None = None) -> torch.Tensor:
    """int64 [rows, 1]: each row of `logits` [rows, vocabulary]'s token, as `sampling` chooses (a draw's noise
    from `draws`, whose counts move on). A draw adds Gumbel noise to the scaled logits of the kept tokens and takes
    the argmax (distributed as their softmax), so it needs no host sync and a CUDA graph can capture it. The cuts
    keep each row's tokens at or above a floor (`kept_floors`: ties with the least kept token stay, as in
    transformers' warpers). On CUDA Triton kernels draw (`_drawn_by_kernels`); on the CPU only the candidates the
    floors were found among are noised where they hold every kept token."""
    if sampling.greedy:
        return logits.argmax(-1, keepdim=True)
    if draws is None:
        raise ValueError("a sampled token needs its draws")
    scores = logits.float() / sampling.temperature
    if _use_kernels(scores):
        return _drawn_by_kernels(scores, sampling, draws)
    floors, candidates = kept_floors(scores, sampling)
    if candidates is not None:
        values, entries = candidates
        noisy = values.masked_fill(values < floors, float("-inf")) - torch.log(-torch.log(draws.uniform(entries)))
        return entries.gather(-1, noisy.argmax(-1, keepdim=True))
    noisy = scores - torch.log(-torch.log(draws.uniform(torch.arange(scores.shape[-1], device=scores.device))))
    if floors is not None:
        noisy = noisy.masked_fill(scores < floors, float("-inf"))
    return noisy.argmax(-1, keepdim=True)


def _drawn_by_kernels(scores: torch.Tensor, sampling: Sampling, draws: Draws) -> torch.Tensor:
    """The draw on CUDA: the argmax of the noisy scores at or above top-k's floor over the whole vocabulary in one
    kernel; with top-p the nucleus's draw settled from it in rounds, two launches more; top-k's floors in two
    launches before (`quantbench.sampling_kernels`; torch's topk for a k or vocabulary too large for them): no sort
    and no host sync. The same tokens as `kept_floors`' draw."""
    from quantbench.sampling_kernels import keyed_draw, nucleus_draw

    floors = _topk_floors(scores, min(sampling.top_k, scores.shape[-1]))
    if sampling.top_p < 1:
        chosen, _ = nucleus_draw(scores, floors, draws.keys, draws.counts, sampling.top_p)
    else:
        chosen = keyed_draw(scores, floors, draws.keys, draws.counts)
    draws.counts.add_(1)
    return chosen


def _topk_floors(scores: torch.Tensor, k: int) -> torch.Tensor:
    """float32 [rows, 1]: each row's k-th largest score, found by the kernels where they take k (`topk_fits`), else
    by torch's topk; -inf for k 0 (no cut)."""
    from quantbench.sampling_kernels import topk_fits, topk_floors

    if not k:
        return torch.full((scores.shape[0], 1), float("-inf"), device=scores.device)
    if topk_fits(k, scores.shape[-1]):
        return topk_floors(scores, k)
    return scores.topk(k, dim=-1).values[:, -1:]


NUCLEUS_CANDIDATES = 1024  # the largest scores a CPU draw looks for the nucleus among first
TIES_MARGIN = 64  # candidates beyond top_k for a CPU draw, for the tokens tied with the k-th


def kept_floors(scores: torch.Tensor, sampling: Sampling):
    """float32 [rows, 1]: each row's least kept score under `top_k` and `top_p` (None: no cut), with the sorted
    candidates (scores, entries) it was found among where, on the CPU, they hold every kept token (else None). A
    token is in the nucleus where the probability of the tokens
    strictly above it (among those top_k keeps) stays below `top_p`. It is found among the `NUCLEUS_CANDIDATES`
    largest scores where one of them is cut away (so every token below is too), else by a sort of all (always on
    CUDA without Triton: a graph cannot wait on that check)."""
    vocabulary = scores.shape[-1]
    if not sampling.top_k and sampling.top_p == 1:
        return None, None
    k = min(sampling.top_k, vocabulary)
    count = min(vocabulary, k + TIES_MARGIN if k else NUCLEUS_CANDIDATES)
    values, entries = scores.topk(count, dim=-1)  # the largest first
    floors = values[:, k - 1:k] if k else None
    on_cpu = scores.device.type == "cpu"
    held = on_cpu and k > 0 and _hold_every_kept(values, floors, vocabulary)  # so they do for any higher floor
    if sampling.top_p < 1:
        # After top_k the probabilities are those among the tokens it keeps, and the nucleus among its candidates
        # is exact: where they hold less than top_p, top_k's floor is the higher.
        if floors is None:
            totals = scores.logsumexp(-1, keepdim=True)
        else:
            pool = values if held else scores
            totals = pool.masked_fill(pool < floors, float("-inf")).logsumexp(-1, keepdim=True)
        nucleus, settled = _nucleus_floors(values, totals, sampling.top_p)
        if not k and count < vocabulary and (not on_cpu or not bool(settled.all())):
            nucleus, _ = _nucleus_floors(scores.sort(dim=-1, descending=True).values, totals, sampling.top_p)
        floors = nucleus if floors is None else torch.maximum(floors, nucleus)
        held = held or (on_cpu and _hold_every_kept(values, floors, vocabulary))
    return floors, (values, entries) if held else None


def _nucleus_floors(ordered: torch.Tensor, totals: torch.Tensor, top_p: float):
    """The least score of each row's nucleus among its `ordered` scores (sorted, largest first; softmax log-sums
    `totals`), and whether a score among them is cut away (so the nucleus lies among them)."""
    probabilities = (ordered - totals).exp()
    kept = probabilities.cumsum(-1) - probabilities < top_p  # the first always stays
    # The mass before the last kept place is at least that strictly above its score: its ties stay too.
    return ordered.gather(-1, kept.sum(-1, keepdim=True) - 1), ~kept[:, -1]


def _hold_every_kept(values: torch.Tensor, floors: torch.Tensor, vocabulary: int) -> bool:
    """Whether the candidates (the largest scores, `values`) hold every score at or above its row's floor: all
    scores, or in every row one below the floor (a host sync)."""
    return values.shape[-1] == vocabulary or bool((values[:, -1:] < floors).all())


def _use_kernels(scores: torch.Tensor) -> bool:
    """Whether the draw takes `quantbench.sampling_kernels`' Triton kernels: on CUDA, where Triton is installed."""
    return scores.is_cuda and importlib.util.find_spec("triton") is not None

"""Orthonormal Walsh–Hadamard transforms of any length that has a Hadamard matrix we can build.

A length n = m·2^k uses H_n = H_m ⊗ H_{2^k}: the 2^k part is a fast transform (a few small ±1 matmuls, see
`_butterfly`, vectorised over all leading dimensions), the m part a small dense matmul with a Paley-construction matrix (m = q + 1 for a
prime q ≡ 3 mod 4, m = 2(q + 1) for a prime q ≡ 1 mod 4). Lengths with no such split (e.g. 11008 = 43·256)
use a block-diagonal rotation of the largest power of two that divides n; `hadamard_plan` says which.
Everything is normalised (H Hᵀ = I), so the transforms are rotations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from quantbench.errors import QuantbenchError

LARGEST_PALEY_ORDER = 1024
RADIX = 128  # the widest Sylvester factor applied as one dense ±1 matmul


@dataclass(frozen=True)
class HadamardPlan:
    n: int
    small: int  # m: the dense factor's order (1 when n is a power of two)
    power: int  # 2^k: the butterfly's length
    blocks: int  # > 1: block-diagonal, `blocks` independent rotations of length small·power

    @property
    def kind(self) -> str:
        if self.blocks > 1:
            return f"blockdiag{self.blocks}x{self.small * self.power}"
        return "sylvester" if self.small == 1 else f"paley{self.small}"


@lru_cache(maxsize=None)
def hadamard_plan(n: int) -> HadamardPlan:
    if n < 1:
        raise QuantbenchError(f"a Hadamard transform needs a positive length, got {n}")
    power = n & -n  # the largest power of two dividing n
    odd = n // power
    if odd == 1:
        return HadamardPlan(n, 1, power, 1)
    small = odd
    while small <= min(n, LARGEST_PALEY_ORDER):  # the smallest m = odd·2^j with a Paley matrix
        if n % small == 0 and _paley_kind(small) is not None:
            return HadamardPlan(n, small, n // small, 1)
        small *= 2
    return HadamardPlan(n, 1, power, odd)


def hadamard_transform(x: torch.Tensor, transpose: bool = False, radix: int = RADIX) -> torch.Tensor:
    """x @ Hᵀ along the last dimension (each row mapped by H), or x @ H with `transpose`; `radix` bounds
    the Sylvester factors applied as one matmul (2: one pass per bit)."""
    plan = hadamard_plan(x.shape[-1])
    leading = x.shape[:-1]
    y = x.reshape(*leading, plan.blocks, plan.small, plan.power)
    y = _butterfly(y, radix)
    if plan.small > 1:
        dense = _paley_on(plan.small, y.device, y.dtype)
        y = torch.matmul(dense.T if transpose else dense, y)
    return (y / math.sqrt(plan.small * plan.power)).reshape(*leading, plan.n)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The explicit orthonormal matrix that `hadamard_transform` applies (rows of H)."""
    return hadamard_transform(torch.eye(n, dtype=dtype)).T


def _butterfly(x: torch.Tensor, radix_limit: int = RADIX) -> torch.Tensor:
    """Unnormalised Sylvester transform along the last dimension (a power of two).

    H_{2^k} = H_{2^a} ⊗ H_{2^b} ⊗ …: each factor (at most `radix_limit` wide, the k bits split evenly) is one
    small ±1 matmul along its own axis of the reshaped rows, so the data is read ⌈k / log2 radix_limit⌉ times
    instead of k times; the last factor is a single [rows, f] @ [f, f] GEMM.
    """
    n = x.shape[-1]
    leading = x.shape[:-1]
    bits = n.bit_length() - 1
    stages = -(-bits // (radix_limit.bit_length() - 1)) if bits else 0
    after = n
    for stage in range(stages):
        radix = 1 << (bits * (stage + 1) // stages - bits * stage // stages)
        after //= radix
        sylvester = _sylvester_on(radix, x.device, x.dtype)
        if after == 1:
            x = x.reshape(-1, radix) @ sylvester  # symmetric: H = Hᵀ
        else:
            x = torch.matmul(sylvester, x.reshape(-1, radix, after))
    return x.reshape(*leading, n)


@lru_cache(maxsize=64)
def _sylvester_on(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)))
    return h.to(device=device, dtype=dtype)


@lru_cache(maxsize=None)
def paley_matrix(m: int) -> torch.Tensor:
    """A ±1 Hadamard matrix of order m from Paley's constructions (float64, H Hᵀ = m I)."""
    kind = _paley_kind(m)
    if kind is None:
        raise QuantbenchError(f"no Paley construction for order {m}")
    q = m - 1 if kind == 1 else m // 2 - 1
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in residues else -1.0 for a in range(1, q)], dtype=torch.float64)
    index = torch.arange(q)
    jacobsthal = chi[(index[None, :] - index[:, None]) % q]  # Q[i, j] = χ(j − i)
    if kind == 1:  # q ≡ 3 (mod 4): H = I + S with S skew, S = [[0, 1ᵀ], [−1, Q]]
        skew = torch.zeros(m, m, dtype=torch.float64)
        skew[0, 1:], skew[1:, 0], skew[1:, 1:] = 1.0, -1.0, jacobsthal
        return torch.eye(m, dtype=torch.float64) + skew
    conference = torch.zeros(q + 1, q + 1, dtype=torch.float64)  # q ≡ 1 (mod 4): symmetric conference matrix
    conference[0, 1:], conference[1:, 0], conference[1:, 1:] = 1.0, 1.0, jacobsthal
    plus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    minus = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(conference, plus) + torch.kron(torch.eye(q + 1, dtype=torch.float64), minus)


@lru_cache(maxsize=64)
def _paley_on(m: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return paley_matrix(m).to(device=device, dtype=dtype)


def _paley_kind(m: int) -> int | None:
    if m % 4 or m < 4:
        return None
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return 1
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return 2
    return None


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, math.isqrt(q) + 1))


@dataclass(frozen=True)
class RandomHadamard:
    """R = diag(s)·Hᵀ with seeded signs s ∈ {±1}ⁿ: rows map as x ↦ x R = H(s ⊙ x).

    A linear layer y = W x keeps its function as (W R)(x R)ᵀ, so the weight is quantized as W R and the
    input rotated online with the same row map; its Hessian becomes Rᵀ (Σ x xᵀ) R.
    """

    n: int
    seed: int

    def signs(self, device=None, dtype=torch.float32) -> torch.Tensor:
        return _signs(self.n, self.seed, torch.device(device or "cpu"), dtype)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """x R for each row of x."""
        return hadamard_transform(x * self.signs(x.device, x.dtype))

    def rows_inverse(self, x: torch.Tensor) -> torch.Tensor:
        """x Rᵀ for each row of x."""
        return hadamard_transform(x, transpose=True) * self.signs(x.device, x.dtype)

    def hessian(self, h: torch.Tensor) -> torch.Tensor:
        """Rᵀ H R of a symmetric H."""
        return self.rows(self.rows(h).T)

    @property
    def kind(self) -> str:
        return hadamard_plan(self.n).kind

    @property
    def descriptor(self) -> dict:
        return {"kind": self.kind, "size": self.n, "seed": self.seed}


@lru_cache(maxsize=64)
def _signs(n: int, seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (n,), generator=generator)
    return (2 * bits - 1).to(device=device, dtype=dtype)

"""Torch fallback of the packed matmul: decode a slab of inputs at a time from the kernel layout and
accumulate x·Wᵀ in float32, so no dequantized copy of the whole weight ever exists."""

from __future__ import annotations

import torch

from quantbench.export.kernels.layout import KernelWeight, with_inputs_gathered
from quantbench.formats.fp import E2M1, E4M3, pow2
from quantbench.formats.mx import E8M0_BIAS
from quantbench.formats.packing import TRITS_PER_BYTE

SLAB_INPUTS = 1024  # inputs decoded per step: bounds the temporary to N × 1024 floats


def decode_slab(weight: KernelWeight, start: int, stop: int) -> torch.Tensor:
    """float32 [stop − start, N]: the weight's (permuted) inputs [start, stop) decoded; start and stop
    multiples of the group and of the word (base-3 ternary: any)."""
    if weight.kind == "ternary3":
        return _decode_base3(weight, start, stop)
    per_word = weight.per_word
    words = weight.word_rows(start // per_word, stop // per_word)
    shifts = torch.arange(per_word, device=words.device, dtype=torch.int32) * weight.bits
    codes = ((words.unsqueeze(1) >> shifts.view(1, -1, 1)) & ((1 << weight.bits) - 1)).flatten(0, 1)
    rows = torch.arange(start, stop, device=codes.device) // weight.group
    if weight.kind == "int":
        zero = (weight.zeros[rows].float() if weight.zeros is not None
                else torch.full((), float(1 << (weight.bits - 1)), device=codes.device))
        return (codes.float() - zero) * weight.scales[rows].float()
    if weight.kind == "ternary":
        scales = weight.scales[:, rows].float()
        return ((codes & 3).float() - 1) * scales[0] + ((codes >> 2).float() - 1) * scales[1]
    if weight.kind == "mxfp4":
        return E2M1.decode(codes.to(torch.uint8)) * pow2(weight.scales[rows].to(torch.int32) - E8M0_BIAS)
    if weight.kind == "nvfp4":
        return E2M1.decode(codes.to(torch.uint8)) * (E4M3.decode(weight.scales[rows]) / weight.global_scale)
    raise ValueError(f"unknown kernel weight kind {weight.kind!r}")


def _decode_base3(weight: KernelWeight, start: int, stop: int) -> torch.Tensor:
    """float32 [stop − start, N] of a `ternary3` weight: input k's trit is digit (k mod G) mod 5 of byte
    ⌊k / G⌋·⌈G/5⌉ + ⌊(k mod G) / 5⌋ of its plane."""
    group = weight.group
    inputs = torch.arange(start, stop, device=weight.qweight.device)
    within = inputs % group
    rows = (inputs // group) * -(-group // TRITS_PER_BYTE) + within // TRITS_PER_BYTE
    powers = (3 ** (within % TRITS_PER_BYTE)).to(torch.int32).view(1, -1, 1)
    trits = (weight.qweight[:, rows].to(torch.int32) // powers) % 3 - 1
    return (trits * weight.scales[:, inputs // group].float()).sum(dim=0)


def slabs(weight: KernelWeight) -> list[tuple[int, int]]:
    """The (start, stop) input ranges decoded one at a time: about SLAB_INPUTS inputs, whole groups and words."""
    n_in = weight.shape[1]
    step = max(SLAB_INPUTS // weight.group, 1) * weight.group if weight.group < n_in else SLAB_INPUTS
    step = max(step - step % weight.per_word, weight.per_word)
    return [(start, min(start + step, n_in)) for start in range(0, n_in, step)]


def packed_matmul_reference(x: torch.Tensor, weight: KernelWeight) -> torch.Tensor:
    """x [M, K] (original input order) → x·Wᵀ [M, N] in x's dtype."""
    x, weight = with_inputs_gathered(x, weight)
    x32 = x.float()
    out = torch.zeros(x.shape[0], weight.shape[0], dtype=torch.float32, device=x.device)
    for start, stop in slabs(weight):
        out += x32[:, start:stop] @ decode_slab(weight, start, stop)
    return out.to(x.dtype)


def packed_matmul_input_gradient(grad: torch.Tensor, weight: KernelWeight) -> torch.Tensor:
    """grad [M, N] → grad·W [M, K] in grad's dtype, in the original input order: the gradient of x·Wᵀ with
    respect to x, decoded slab by slab as the forward is."""
    grad32 = grad.float()
    permuted = torch.empty(grad.shape[0], weight.shape[1], dtype=torch.float32, device=grad.device)
    for start, stop in slabs(weight):
        permuted[:, start:stop] = grad32 @ decode_slab(weight, start, stop).T
    return in_original_order(permuted, weight.perm).to(grad.dtype)


def dequantize_kernel_weight(weight: KernelWeight) -> torch.Tensor:
    """float32 [N, K] in the original input order (tests and debugging)."""
    return in_original_order(decode_slab(weight, 0, weight.shape[1]).T, weight.perm)


def in_original_order(columns: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """[rows, K] columns in the stored input order → the original order (act_order's `perm`: stored k is input
    perm[k]); contiguous."""
    if perm is None:
        return columns.contiguous()
    out = torch.empty_like(columns, memory_format=torch.contiguous_format)
    out[:, perm.long()] = columns
    return out

"""Kahan-compensated accumulation of float32 matrices: `total += term` with `carry` keeping what float32 rounding
dropped. On CUDA one Triton pass reads term, total and carry and writes total and carry (20 bytes per element,
against 48 for the same four steps as separate torch kernels); elsewhere the torch steps."""

from __future__ import annotations

import importlib.util

import torch

BLOCK = 4096


def kahan_add_(total: torch.Tensor, carry: torch.Tensor, term: torch.Tensor) -> None:
    """In place: y = term − carry; t = total + y; carry = (t − total) − y; total = t."""
    if total.is_cuda and importlib.util.find_spec("triton") is not None:
        from quantbench.calibration.compensated_sum_kernel import kahan_add_kernel

        n = total.numel()
        kahan_add_kernel[(-(-n // BLOCK),)](total, carry, term, n, BLOCK=BLOCK)
        return
    y = term - carry
    t = total + y
    torch.sub(t, total, out=carry).sub_(y)
    total.copy_(t)

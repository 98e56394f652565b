"""Kahan-compensated accumulation in float32: `total += term` with `carry` keeping what float32 rounding dropped.

`kahan_add_` adds one matrix. `compensated_gram_` adds xᵀx of half-precision activations: bf16/fp16 products are
exact in float32, so all its error is in the summation. On CUDA one Triton kernel computes each tile of the upper
triangle with tensor-core dots, Kahan-adds every short sum of GRAM_STEP × STEPS_PER_SUM tokens to the tile in
registers and mirrors it, so the products are never written out; elsewhere chunks of COMPENSATED_CHUNK tokens
are multiplied and Kahan-added with `kahan_add_`."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

COMPENSATED_CHUNK = 1024  # off the Triton path: tensor-core sums of 1,024 products err less than float32 ones of 16K
GRAM_TILE = 128
GRAM_STEP = 128
STEPS_PER_SUM = 1  # Kahan-add every 128 tokens; the fastest of bench/hessian_precision.py --tune on an H200
GRAM_LAUNCH = {"num_warps": 8, "num_stages": 3}
TILE_GROUP = 8  # tiles run in groups of 8 row tiles, column by column, so that neighbours share inputs in L2


def kahan_add_(total: torch.Tensor, carry: torch.Tensor, term: torch.Tensor) -> None:
    """In place: y = term − carry; t = total + y; carry = (t − total) − y; total = t."""
    y = term - carry
    t = total + y
    torch.sub(t, total, out=carry).sub_(y)
    total.copy_(t)


def compensated_gram_(total: torch.Tensor, carry: torch.Tensor, x: torch.Tensor) -> None:
    """In place: total += xᵀx for x [tokens, width], Kahan-compensated with `carry` (both float32 [width, width])."""
    if total.is_cuda and importlib.util.find_spec("triton") is not None:
        _triton_gram(total, carry, x.contiguous())
        return
    for chunk in x.split(COMPENSATED_CHUNK):
        kahan_add_(total, carry, float32_products(chunk))


def float32_products(x: torch.Tensor) -> torch.Tensor:
    """xᵀx with float32 output: on tensor cores where the device has them for x's dtype."""
    if x.is_cuda:
        return torch.mm(x.T, x, out_dtype=torch.float32)
    x = x.float()
    return x.T @ x


@functools.lru_cache(maxsize=32)
def upper_tiles(width: int, tile: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column tile indices of the tiles on and above the diagonal of a [width, width] matrix, in groups of
    TILE_GROUP row tiles, column by column."""
    count = -(-width // tile)
    rows, cols = torch.triu_indices(count, count)
    order = torch.argsort((rows // TILE_GROUP * count + cols) * count + rows)
    return rows[order].to(device, torch.int32), cols[order].to(device, torch.int32)


def _triton_gram(total: torch.Tensor, carry: torch.Tensor, x: torch.Tensor) -> None:
    from quantbench.calibration.compensated_gram_kernel import compensated_gram_kernel

    rows, cols = upper_tiles(x.shape[1], GRAM_TILE, x.device)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    options = {} if interpreted else GRAM_LAUNCH
    compensated_gram_kernel[(rows.numel(),)](x, total, carry, rows, cols, x.shape[0], x.shape[1], x.stride(0),
                                             TILE=GRAM_TILE, STEP=GRAM_STEP, STEPS_PER_SUM=STEPS_PER_SUM,
                                             UPCAST=interpreted, **options)

"""Cache-sized pieces for elementwise chains on the CPU."""

from __future__ import annotations

import torch

CPU_CHUNK_ELEMENTS = 1 << 18


def rowwise_chunked(fn, *tensors: torch.Tensor) -> torch.Tensor:
    """`fn(*tensors)`, computed on slices of rows (dim 0) that fit in cache when the tensors are on the
    CPU: chains of elementwise ops over large tensors are bound by memory traffic there. On other
    devices, one call."""
    first = tensors[0]
    if first.device.type != "cpu" or first.numel() <= CPU_CHUNK_ELEMENTS:
        return fn(*tensors)
    step = max(1, CPU_CHUNK_ELEMENTS // max(1, first[0].numel()))
    return torch.cat([fn(*(t[i:i + step] for t in tensors)) for i in range(0, first.shape[0], step)])

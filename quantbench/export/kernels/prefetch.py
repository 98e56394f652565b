"""The next packed weight into L2 ahead of its matmul.

A decode step alternates packed matmuls, which stream their weights from memory, with small kernels (norms,
the rotary embedding, attention over a short cache, activations) during which the memory idles.
`link_prefetches(model)` gives each packed layer the one that runs after it (the last, the first: the next
step's). The CUDA kernels (packed_gemv.cu, packed_mma.cu), their own loads done, then ask L2 for the first
`budget_bytes` of that layer's packed words, and the next matmul finds them there. Triton and the torch
fallback ignore it; results never depend on it.

The budget: QUANTBENCH_L2_PREFETCH_MB, else `set_budget`, else half the device's L2. 0 turns it off.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn

BUDGET_ENV = "QUANTBENCH_L2_PREFETCH_MB"
_budget: int | None = None  # set_budget's bytes


def set_budget(megabytes: float | None) -> None:
    """Bytes of the next weight to prefetch, in MB (2^20); None: back to the default."""
    global _budget
    if megabytes is not None and megabytes < 0:
        raise ValueError(f"a prefetch budget is ≥ 0 MB, not {megabytes}")
    _budget = None if megabytes is None else int(megabytes * 2**20)


def budget_bytes(device: torch.device) -> int:
    value = os.environ.get(BUDGET_ENV)
    if value is not None:
        try:
            megabytes = float(value)
        except ValueError:
            raise ValueError(f"{BUDGET_ENV}={value!r}: expected a number of MB") from None
        if megabytes < 0:
            raise ValueError(f"{BUDGET_ENV}={value!r}: expected a number of MB ≥ 0")
        return int(megabytes * 2**20)
    if _budget is not None:
        return _budget
    return _l2_bytes(device) // 2


@functools.cache
def _l2_bytes(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).L2_cache_size


def prefetch_bytes(words: torch.Tensor | None) -> int:
    """How many of `words`' first bytes a kernel asks L2 for: the budget at most, in 16-byte pieces."""
    if words is None or not words.is_cuda:
        return 0
    return min(words.numel() * words.element_size(), budget_bytes(words.device)) // 16 * 16


def link_prefetches(model: nn.Module) -> int:
    """Point every packed layer at the one registered after it (for a decoder, the one that runs next), the
    last at the first; experts are left out (which of them run depends on the token). Returns the links."""
    from quantbench.export.kernels.modules import PackedLinear

    chain = [module for name, module in model.named_modules()
             if isinstance(module, PackedLinear) and ".experts." not in f".{name}."]
    for module, following in zip(chain, chain[1:] + chain[:1]):
        module.prefetch_next(following if len(chain) > 1 else None)
    return len(chain) if len(chain) > 1 else 0

"""int4 matmuls on the CPU through torch's own int4 kernel (`aten._weight_int4pack_mm_for_cpu`, torch's
tinygemm for CPUs), for bfloat16 x, where quantbench's C++ kernels (cpu_packed.py) cannot be built: the weight
stays 4-bit, where the torch fallback decodes it to float on every call. It keeps its own copy of the words
(torch's int4 layout) beside the packed ones, which is why quantbench's kernel comes first.

The kernel computes w = (q − 8)·s + m per group, so an asymmetric weight w = (q − z)·s takes m = (8 − z)·s;
scales and m are bfloat16 there, so results agree with the dequantized matmul to bfloat16 rounding. In float32
and float16 the kernel is slower than a dense matmul on this machine (docs/performance.md), so only bfloat16 x
comes here. Each weight is converted once, on its first call, and kept beside its packed words.
"""

from __future__ import annotations

import weakref

import torch

from quantbench.export.kernels.layout import KernelWeight, with_inputs_gathered
from quantbench.formats.packing import unpack_bits

GROUPS = (32, 64, 128, 256)  # the group sizes the kernel takes
_converted: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(qweight) → (int4pack, scales and m)


def applies(x: torch.Tensor, weight: KernelWeight) -> bool:
    n_out, n_in = weight.shape
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and weight.kind == "int" and weight.bits == 4
            and weight.group in GROUPS and n_in % weight.group == 0 and n_out % 16 == 0
            and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"))


def cpu_int4_matmul(x: torch.Tensor, weight: KernelWeight) -> torch.Tensor:
    """x [M, K] bfloat16 (original input order) → x·Wᵀ [M, N] bfloat16."""
    key = id(weight.qweight)
    converted = _converted.get(key)
    if converted is None:
        converted = _converted[key] = _int4pack(weight)
        weakref.finalize(weight.qweight, _converted.pop, key, None)
    x, weight = with_inputs_gathered(x, weight)
    packed, scales_and_m = converted
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), packed, weight.group, scales_and_m)


def _int4pack(weight: KernelWeight) -> tuple[torch.Tensor, torch.Tensor]:
    n_out, n_in = weight.shape
    words = weight.row_major().qweight
    codes = unpack_bits(words.T.contiguous(), 4, n_in).to(torch.int32)  # [N, K], act_order's order
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    scales = weight.scales.float()
    zeros = weight.zeros.float() if weight.zeros is not None else torch.full_like(scales, 8.0)
    return packed, torch.stack([scales, (8.0 - zeros) * scales], -1).to(torch.bfloat16).contiguous()

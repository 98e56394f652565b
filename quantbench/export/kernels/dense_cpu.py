"""The dense linears of a model loaded with `kernels=True` (its lm_head, layers left dense) on the CPU: a decode
step's few rows of x (DENSE_KERNEL_ROWS) go through quantbench's C++ library (`packed_cpu.cpp`,
`dense_matmul`), which reads the weight at about the memory's rate; torch's matrix-vector products read it at
about half that on this project's test machine (docs/performance.md, "Packed models on the CPU"). float32
weights, and bfloat16 where the CPU has bfloat16 dot products; every other call is nn.Linear's own.
"""

from __future__ import annotations

import torch
from torch import nn

from quantbench.export.kernels import cpu_packed

# The most rows of x through the library, by dtype: on a 32000 × 2048 head (`bench/cpu_decode.py --shape
# 2048x32000`) float32 took 7.7 / 12.6 / 23.8 / 49 ms at 1 / 4 / 8 / 16 rows against torch's 13.5 / 43.6 / 46.4 /
# 51; bfloat16 3.9 / 5.2 / 9.9 ms at 1 / 4 / 8 against 6.4 / 6.2 / 8.7.
DENSE_KERNEL_ROWS = {torch.float32: 8, torch.bfloat16: 4}


class CpuDenseLinear(nn.Linear):
    """nn.Linear whose forward takes the library's dense rows where they apply. A model's nn.Linear becomes one in
    place (`use_dense_rows`), so its parameters, hooks and tied weights stay as they are."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not applies(x, self.weight):
            return super().forward(x)
        y = cpu_packed.dense_matmul(x.reshape(-1, x.shape[-1]), self.weight)
        y = y.view(*x.shape[:-1], self.out_features)
        return (y if self.bias is None else y + self.bias).to(x.dtype)


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the library multiplies these (inference on the CPU, a few rows, float32 or bfloat16 with its dot
    products)."""
    rows = x.numel() // max(x.shape[-1], 1)
    return (x.device.type == "cpu" and weight.device.type == "cpu" and x.dtype == weight.dtype
            and rows <= DENSE_KERNEL_ROWS.get(x.dtype, 0) and weight.is_contiguous()
            and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and cpu_packed.available()
            and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and cpu_packed.dense_takes_bfloat16())))


def use_dense_rows(model: nn.Module) -> list[str]:
    """Every plain nn.Linear of `model` takes CpuDenseLinear's forward; their names."""
    names = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear:
            module.__class__ = CpuDenseLinear
            names.append(name)
    return names

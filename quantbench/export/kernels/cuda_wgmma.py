"""Launching the warpgroup tensor-core kernel (`packed_wgmma.cu`: Hopper's wgmma with the weight decoded in
registers as A and x through shared memory as B) for 1–64 rows of float16 x, through ctypes on the current CUDA
stream (built by cuda_build.py for sm_90a). act_order is gathered once per call by the tensor-core library's
gather, which the kernel may overlap: launched dependent on it, it loads its weights while the gather runs."""

from __future__ import annotations

import torch

from quantbench.export.kernels import cuda_build
from quantbench.export.kernels.cuda_build import WeightType, pointer, row_shift
from quantbench.export.kernels.cuda_mma import ROWS, prepare
from quantbench.export.kernels.kernel_call import KernelCall, Slot
from quantbench.export.kernels.layout import KernelWeight

GROUPS = (1, 2)  # warpgroups side by side along the outputs, sharing x's stages
OUTPUTS_PER_GROUP = 128
SLAB_INPUTS = 128  # inputs per shared-memory stage: split-K gives each block whole slabs
CAPABILITY = (9, 0)  # wgmma is sm_90a's


def unsupported_reason(x: torch.Tensor, weight: KernelWeight) -> str | None:
    """Why the warpgroup kernel does not take this call (None when it does)."""
    if x.shape[0] > ROWS[-1]:
        return f"{x.shape[0]} rows of x: the warpgroup kernel takes up to {ROWS[-1]}"
    if weight.kind == "mxfp4":
        return "MXFP4's scales may leave float16's range in the weight's fragment"
    if x.shape[1] % 8:
        return f"{x.shape[1]} inputs are not a multiple of 8 (x reaches shared memory in 16-byte pieces)"
    reason = cuda_build.unsupported_reason(x, weight)
    if reason is not None:
        return reason
    if cuda_build.device_capability(x.device) != CAPABILITY:
        return "wgmma runs on sm_90 (Hopper) only"
    return None


def split_choices(m: int, weight: KernelWeight, rows: int, groups: int, processors: int) -> list[int]:
    """Splits of K worth timing: none; and where the blocks leave multiprocessors without one, the fewest splits
    that give each one a block and twice that, each split keeping a slab of 128 inputs of its own."""
    blocks = -(-weight.shape[0] // (OUTPUTS_PER_GROUP * groups)) * -(-m // rows)
    if blocks >= processors:
        return [1]
    most = -(-weight.shape[1] // SLAB_INPUTS)
    fill = cuda_build.splits_to_fill(blocks, processors, most)
    return sorted({min(s, most) for s in (1, fill, 2 * fill)})


def launch(x: torch.Tensor, weight: KernelWeight, rows: int, groups: int = 1, splits: int = 1,
           overlap_gather: bool = False) -> torch.Tensor:
    """x [M ≤ 64, K] float16 in the original input order → [M, N] float16 (`bind`'s call, made and run once)."""
    return bind(x, weight, rows, groups, splits, overlap_gather)(x)


def bind(x: torch.Tensor, weight: KernelWeight, rows: int, groups: int = 1, splits: int = 1,
         overlap_gather: bool = False) -> KernelCall:
    """The kernel's call for x's rows, on x's device: x [M ≤ 64, K] float16 in the original input order → [M, N]
    float16. `rows`: rows of x per block, the products' N (8, 16, 32 or 64, as the tensor-core kernel's;
    `cuda_mma.rows_for`); `groups`: warpgroups per block, 128 outputs each; `splits`: blocks along K per block of
    outputs, whose float32 sums the last to finish adds in split order; `overlap_gather` (act_order, where the
    device can): the kernel launched to start while the gather runs."""
    reason = unsupported_reason(x, weight)
    if reason is not None:
        raise ValueError(f"the warpgroup kernel does not run this call: {reason}")
    if rows not in ROWS or groups not in GROUPS or not 1 <= splits <= 65535:
        raise ValueError(f"rows {rows}, groups {groups}, splits {splits}: not among {ROWS}, {GROUPS}, 1–65535")
    weight_type = WeightType.for_wgmma(weight)
    arch = cuda_build.device_arch(x.device)  # act_order gathered by the tensor-core library's gather
    gather, dependent, workspace = prepare(x, weight, WeightType.for_mma(weight, scales_in_b=True), arch,
                                           overlap_gather, splits)
    arguments = [rows, groups, splits, Slot.X, weight.qweight.data_ptr(), weight.scales.data_ptr(),
                 pointer(weight.zeros), Slot.OUT, *map(pointer, workspace), x.shape[0], weight.shape[0], x.shape[1],
                 weight.n_groups, row_shift(weight), Slot.X_STRIDE, 1.0 / weight.global_scale, dependent, Slot.STREAM]
    return KernelCall(weight_type, arch, "wgmma", arguments, x.device, x.shape[0], weight.shape[0],
                      holds=(weight.tensors(), workspace), gather=gather)

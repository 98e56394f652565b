"""Launching the tensor-core kernel (`packed_mma.cu`: mma.sync on weights decoded in registers) for 1–64
rows of float16 x, through ctypes on the current CUDA stream (built by cuda_build.py). act_order is gathered
once per call, before the kernel, by the library's own gather, which the kernel may overlap: launched
dependent on it, it loads its weights while the gather runs."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from quantbench.export.kernels import cuda_build
from quantbench.export.kernels.cuda_build import WeightType, pointer, row_shift
from quantbench.export.kernels.kernel_call import KernelCall, Slot
from quantbench.export.kernels.layout import KernelWeight

ROWS = (8, 16, 32, 64)  # rows of x per block: 8 leave the upper half of each 16-row product idle
WARPS = (4, 8)
WARPS_N = (1, 2, 4)  # warps side by side along the outputs (32 each); the others split the inputs
MAX_ROWS = 64  # beyond this only the tl.dot kernel is tried
SCALES_IN_B_ROWS = 64  # blocks this tall put the scales into B: no registers are left for span sums
STEP_ROWS, SLAB = 4, 4  # word rows per k-step, k-steps per slab: split-K gives each block whole slabs
SPLIT_ROWS = (8, 16)  # split-K is built for these blocks only (taller ones never gained from it)
CAPPED_ROWS, CAPPED_WARPS_N = (32,), 4  # capped blocks: registers capped at 128 so that 16 warps share a multiprocessor


def unsupported_reason(x: torch.Tensor, weight: KernelWeight) -> str | None:
    """Why the tensor-core kernel does not take this call (None when it does)."""
    if x.shape[0] > MAX_ROWS:
        return f"{x.shape[0]} rows of x: the tensor-core kernel takes up to {MAX_ROWS}"
    return cuda_build.unsupported_reason(x, weight)


MX_CODES_IN_B = (114, 140)  # E8M0 codes c whose blocks stay exact float16 normals in B: 0.5·2^(c−127) ≥ 2^-14,
# 6·2^(c−127) ≤ 65504
_mx_scales_checked: dict[int, tuple[weakref.ref, bool]] = {}  # scales' address → (the scales, whether they fit)


def mx_scales_fit_b(weight: KernelWeight) -> bool:
    """MXFP4: whether every block's E2M1 values times its scale are exact float16 normals (E8M0 codes 114–140,
    scales 2^-13 … 2^13), so that the scales may go into B; checked once per scales tensor, outside a CUDA graph
    capture (inside one, an unchecked weight counts as not fitting). Other kinds: True."""
    if weight.kind != "mxfp4":
        return True
    scales = weight.scales
    checked = _mx_scales_checked.get(scales.data_ptr())
    if checked is not None and checked[0]() is scales:  # not a dead tensor's address taken by another
        return checked[1]
    if scales.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    low, high = MX_CODES_IN_B
    fits = bool(((scales >= low) & (scales <= high)).all())
    _mx_scales_checked[scales.data_ptr()] = (weakref.ref(scales), fits)
    return fits


def row_choices(weight: KernelWeight) -> tuple[int, ...]:
    """Rows per block this weight can take: 64 only where its scales can go into B (MXFP4: mx_scales_fit_b)."""
    return ROWS if mx_scales_fit_b(weight) else tuple(r for r in ROWS if r < SCALES_IN_B_ROWS)


def rows_for(m: int, weight: KernelWeight) -> int:
    """The fewest rows per block that hold m rows of x (beyond the tallest block, more blocks)."""
    choices = row_choices(weight)
    return next((rows for rows in choices if m <= rows), choices[-1])


def scales_in_b_choices(rows: int, weight: KernelWeight) -> tuple[bool, ...]:
    """Whether to also try blocks below 64 rows with the scales in B instead of on span sums: where the weight has
    span sums (groups of whole k-steps) and B stays exact (MXFP4: mx_scales_fit_b). B costs a multiplication a code
    pair; span sums cost float32 adds at each span's end, and ternary's two planes two products per k16 instead of
    one. 64-row blocks always put the scales into B."""
    if rows >= SCALES_IN_B_ROWS or WeightType.for_mma(weight).flush == 0 or not mx_scales_fit_b(weight):
        return (False,)
    return (False, True)


def capped_choices(rows: int, warps_n: int, x_shared: bool, weight: KernelWeight) -> tuple[bool, ...]:
    """Whether to also try the registers capped at 128 a thread (16 warps a multiprocessor): for blocks of 32
    rows whose 4 warps side by side share x's stages, but not for ternary's two planes of span sums (they, and
    64-row blocks, spill under the cap)."""
    spills = weight.kind == "ternary" and WeightType.for_mma(weight).flush > 0
    return (False, True) if rows in CAPPED_ROWS and warps_n == CAPPED_WARPS_N and x_shared and not spills else (False,)


def split_choices(m: int, weight: KernelWeight, rows: int, warps: int, warps_n: int, processors: int) -> list[int]:
    """Splits of K worth timing: none; and for blocks of 8 or 16 rows that leave multiprocessors without a
    block, the fewest splits that give each one and twice that, while each of a block's groups of warps along K
    keeps a slab of its own in each split."""
    blocks = -(-weight.shape[0] // (32 * warps_n)) * -(-m // rows)
    if rows not in SPLIT_ROWS or blocks >= processors:
        return [1]
    steps = -(-(weight.shape[1] // weight.per_word) // STEP_ROWS)
    most = max(1, steps // (warps // warps_n * SLAB))
    fill = cuda_build.splits_to_fill(blocks, processors, most)
    return sorted({min(s, most) for s in (1, fill, 2 * fill)})


def launch(x: torch.Tensor, weight: KernelWeight, rows: int, warps: int, warps_n: int,
           x_shared: bool = False, overlap_gather: bool = False, splits: int = 1, capped: bool = False,
           gated: bool = False, scales_in_b: bool = False) -> torch.Tensor:
    """x [M ≤ 64, K] float16 in the original input order → [M, N] float16 (`bind`'s call, made and run once)."""
    return bind(x, weight, rows, warps, warps_n, x_shared, overlap_gather, splits, capped, gated, scales_in_b)(x)


def bind(x: torch.Tensor, weight: KernelWeight, rows: int, warps: int, warps_n: int,
         x_shared: bool = False, overlap_gather: bool = False, splits: int = 1, capped: bool = False,
         gated: bool = False, scales_in_b: bool = False) -> KernelCall:
    """The kernel's call for x's rows, on x's device: x [M ≤ 64, K] float16 in the original input order → [M, N]
    float16. `x_shared`: x through shared-memory stages instead of from global memory at each k-step;
    `overlap_gather` (act_order, where the device can): the kernel launched to start while the gather runs, else
    once it is done (whatever dependent launch says for the gather itself); `splits`: blocks along K per block of
    outputs, whose float32 sums the last to finish adds in split order; `capped` (32 rows, 4 warps along the
    outputs, x_shared): registers capped so that 16 warps share a multiprocessor; `scales_in_b` (below 64 rows,
    where scales_in_b_choices offers it): the scales go into B, not onto span sums."""
    reason = unsupported_reason(x, weight)
    if reason is not None:
        raise ValueError(f"the tensor-core kernel does not run this call: {reason}")
    if (rows not in row_choices(weight) or warps not in WARPS or warps_n not in WARPS_N or warps_n > warps
            or not 1 <= splits <= 65535 or (splits > 1 and rows not in SPLIT_ROWS)
            or capped not in capped_choices(rows, warps_n, x_shared, weight)
            or scales_in_b not in scales_in_b_choices(rows, weight)):
        raise ValueError(f"rows {rows}, warps {warps}, warps_n {warps_n}, splits {splits}, capped {capped}: not among "
                         f"{row_choices(weight)}, {WARPS}, {WARPS_N} (warps_n ≤ warps), 1–65535 (beyond 1 only "
                         f"with {SPLIT_ROWS} rows); capped only with {CAPPED_ROWS} rows, warps_n {CAPPED_WARPS_N} and "
                         f"x_shared (not ternary span sums); scales_in_b {scales_in_b} only below "
                         f"{SCALES_IN_B_ROWS} rows where the weight has span sums")
    weight_type = WeightType.for_mma(weight, scales_in_b=scales_in_b or rows == SCALES_IN_B_ROWS)
    arch = cuda_build.device_arch(x.device)
    gather, dependent, workspace = prepare(x, weight, weight_type, arch, overlap_gather, splits)
    arguments = [rows, warps, warps_n, int(x_shared), int(capped), splits, Slot.X, weight.qweight.data_ptr(),
                 weight.scales.data_ptr(), pointer(weight.zeros), Slot.OUT, *map(pointer, workspace), x.shape[0],
                 weight.shape[0], x.shape[1], weight.n_groups, row_shift(weight), Slot.X_STRIDE, int(gated),
                 1.0 / weight.global_scale, dependent, Slot.STREAM]
    return KernelCall(weight_type, arch, "mma", arguments, x.device, x.shape[0],
                      weight.shape[0] // 2 if gated else weight.shape[0],
                      holds=(weight.tensors(), workspace), gather=gather)


def prepare(x: torch.Tensor, weight: KernelWeight, gather_type: WeightType, arch: str, overlap_gather: bool,
            splits: int) -> tuple[Callable | None, int, tuple]:
    """What a tensor-core kernel's call needs besides its tile: act_order's gather by `gather_type`'s library
    (None without act_order), whether the kernel launches dependent (on the gather where `overlap_gather` asks and
    the device can, else as dependent launch says) and split-K's workspace (partials and arrivals, or Nones)."""
    m, n = x.shape[0], weight.shape[0]
    workspace = cuda_build.split_workspace(x.device, splits, m, n) if splits > 1 else (None, None)
    if weight.perm is None:
        return None, cuda_build.dependent_launch(x.device), workspace
    call = KernelCall(gather_type, arch, "gather", [Slot.X, weight.perm.data_ptr(), Slot.OUT, m, x.shape[1],
                                                     Slot.X_STRIDE, cuda_build.dependent_launch(x.device), Slot.STREAM],
                      x.device, m, x.shape[1], holds=(weight.perm,))
    return (lambda x: call.launch(x, torch.empty_like(x)),
            int(overlap_gather and cuda_build.can_launch_dependent(x.device)), workspace)

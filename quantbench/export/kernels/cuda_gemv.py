"""Launching the CUDA decode kernel (`packed_gemv.cu`, CUDA cores) for 1–16 rows of float16 x, through
ctypes on the current CUDA stream, so CUDA graphs capture it like any other kernel (built by
cuda_build.py)."""

from __future__ import annotations

import dataclasses
import functools

import torch

from quantbench.export.kernels import cuda_build
from quantbench.export.kernels.cuda_build import WeightType, pointer, row_shift
from quantbench.export.kernels.kernel_call import KernelCall, Slot
from quantbench.export.kernels.layout import KernelWeight

ROWS = (1, 2, 4, 8)  # rows of x per program
LANES = (4, 8, 16, 32)  # threads along the outputs (4 outputs each)
THREADS = (128, 256, 512)  # 512 with one row of x only
ASYNC_ROWS = (1, 2)  # the cp.async variant is built for these rows per block
STREAMED_ROWS = (1, 2)  # and the register variant that reloads each word row as soon as it is used
X_SHARED_BYTES = 96 << 10  # the block's x in shared memory up to this (act_order: gathered there, else by torch)
MAX_ROWS = 16  # beyond this only the tensor-core and tl.dot kernels are tried
SLAB = 8  # word rows a thread loads at once; split-K gives each block whole slabs


def unsupported_reason(x: torch.Tensor, weight: KernelWeight) -> str | None:
    """Why the CUDA decode kernel does not take this call (None when it does)."""
    if x.shape[0] > MAX_ROWS:
        return f"{x.shape[0]} rows of x: the CUDA decode kernel takes up to {MAX_ROWS}"
    return cuda_build.unsupported_reason(x, weight)


def split_rows(word_rows: int, splits: int) -> int:
    """The word rows of each block along K (packed_gemv.cu's split_rows)."""
    per_split = -(-word_rows // splits)
    return -(-per_split // SLAB) * SLAB


@functools.cache
def multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_choices(m: int, weight: KernelWeight, rows: int, lanes: int, threads: int, processors: int) -> list[int]:
    """Splits of K worth timing: none, and the fewest that give every multiprocessor a block, and twice and
    four times that, while each of a block's row lanes keeps a slab of its own."""
    blocks = -(-weight.shape[0] // (4 * lanes)) * -(-m // rows)
    word_rows = weight.shape[1] // weight.per_word
    most = max(1, word_rows // (threads // lanes * SLAB))
    fill = cuda_build.splits_to_fill(blocks, processors, most)
    return sorted({min(s, most) for s in (1, fill, 2 * fill, 4 * fill)})


def column_block_choices(n: int, lanes: int, per_column: int, processors: int) -> list[int]:
    """Blocks along the outputs worth timing (packed_gemv.cu's column_blocks): 0, one per 4 · lanes outputs;
    and as many as give each multiprocessor one or two blocks, with `per_column` blocks (row tiles × splits)
    for each, where that is more and each block still gets at least 4 outputs."""
    tiles = -(-n // (4 * lanes))
    blocks = (-(-per_processor * processors // per_column) for per_processor in (1, 2))
    return [0] + sorted({b for b in blocks if tiles < b <= n // 4})


def x_held_bytes(k: int, weight: KernelWeight, rows: int, splits: int) -> int:
    """Shared memory for a block's x: its rows of inputs, and for act_order the whole rows it gathers from."""
    held = split_rows(k // weight.per_word, splits) * weight.per_word
    return rows * (held + (k if weight.perm is not None else 0)) * 2


def x_choices(weight: KernelWeight) -> tuple[bool, ...]:
    """Where a block's x may come from (True: shared memory); act_order always gathers it there."""
    return (True,) if weight.perm is not None else (True, False)


def launch(x: torch.Tensor, weight: KernelWeight, rows: int, lanes: int, threads: int, async_copies: bool = False,
           load_only: int = 0, splits: int = 1, x_in_shared: bool = True, streamed: bool = False,
           column_blocks: int = 0, gated: bool = False) -> torch.Tensor:
    """x [M ≤ 16, K] float16 in the original input order → [M, N] float16 (`bind`'s call, made and run once)."""
    return bind(x, weight, rows, lanes, threads, async_copies, load_only, splits, x_in_shared, streamed,
                column_blocks, gated)(x)


def bind(x: torch.Tensor, weight: KernelWeight, rows: int, lanes: int, threads: int, async_copies: bool = False,
         load_only: int = 0, splits: int = 1, x_in_shared: bool = True, streamed: bool = False,
         column_blocks: int = 0, gated: bool = False) -> KernelCall:
    """The kernel's call for x's rows, on x's device: x [M ≤ 16, K] float16 in the original input order → [M, N]
    float16. `async_copies`: the weights through cp.async stages in shared memory (1–2 rows) instead of
    registers; `load_only` (for timing, the result meaningless): 1 the weight loads alone, 2 the loads with a
    tensor-core decode's instructions; `splits`: blocks along K per column tile; `x_in_shared`: each block first
    copies its x into shared memory where it fits (act_order gathers it there whatever this says), else reads x
    from memory slab by slab; `streamed` (registers, 1–2 rows): each word row's next load issued as soon as the
    row is used, instead of a slab at a time; `column_blocks`: blocks along the outputs, each an even share of at
    most 4 · lanes of them (0: one block per 4 · lanes outputs); `gated`: the weight's outputs are a gated MLP's gate
    and up rows interleaved (gate_up_interleaved), and the call returns silu(gate)·up [M, N / 2]."""
    reason = unsupported_reason(x, weight)
    if reason is not None:
        raise ValueError(f"the CUDA decode kernel does not run this call: {reason}")
    if (rows not in ROWS or lanes not in LANES or threads not in THREADS or (threads == 512 and rows > 1)
            or (async_copies and rows not in ASYNC_ROWS) or not 1 <= splits <= 65535
            or (streamed and (async_copies or rows not in STREAMED_ROWS))):
        raise ValueError(f"rows {rows}, lanes {lanes}, threads {threads}, async {async_copies}, splits {splits}, "
                         f"streamed {streamed}: not among {ROWS}, {LANES}, {THREADS} (512 threads take one row; "
                         f"async copies {ASYNC_ROWS} rows; streamed registers {STREAMED_ROWS} rows; splits 1–65535)")
    n = weight.shape[0]
    tiles = -(-n // (4 * lanes))
    if column_blocks and not tiles <= column_blocks <= n // 4:
        raise ValueError(f"{column_blocks} column blocks: {n} outputs need {tiles}–{n // 4} blocks "
                         f"of at most {4 * lanes} outputs, 4 at least")
    m, k = x.shape
    gather = None
    fits = x_held_bytes(k, weight, rows, splits) <= X_SHARED_BYTES
    if not fits and weight.perm is not None:  # act_order: gathered by torch instead, x then read from memory
        perm = weight.perm
        gather, weight = (lambda x: x.index_select(1, perm)), dataclasses.replace(weight, perm=None)
    x_shared = fits and (x_in_shared or weight.perm is not None)
    weight_type = WeightType.of(weight, weight.perm is not None, load_only)
    partials = arrivals = None
    if splits > 1:
        partials, arrivals = cuda_build.split_workspace(x.device, splits, m, n)
    arguments = [rows, lanes, threads, int(async_copies), splits, column_blocks, Slot.X, pointer(weight.perm),
                 weight.qweight.data_ptr(), weight.scales.data_ptr(), pointer(weight.zeros), Slot.OUT,
                 pointer(partials), pointer(arrivals), m, n, k, weight.n_groups, row_shift(weight), Slot.X_STRIDE,
                 int(x_shared), int(streamed), int(gated), 1.0 / weight.global_scale,
                 cuda_build.dependent_launch(x.device), Slot.STREAM]
    return KernelCall(weight_type, cuda_build.device_arch(x.device), "gemv", arguments, x.device, m,
                      n // 2 if gated else n,
                      holds=(weight.tensors(), partials, arrivals), contiguous=False, gather=gather)

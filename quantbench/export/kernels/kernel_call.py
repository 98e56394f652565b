"""`KernelCall`: one CUDA library entry point with its arguments bound once, for a weight, a tile and a number of
rows of x, then called for each x of those rows. Each call checks x's rows and layout, makes the output and passes
only what changes from call to call (x's address and row stride, the output's address, the stream), every other
argument converted to its C type when bound: an eager packed layer's host time is mostly this path
(docs/performance.md, "Packed layers without CUDA graphs")."""

from __future__ import annotations

import ctypes
import enum
from collections.abc import Callable

import torch

from quantbench.export.kernels import cuda_build


class Slot(enum.Enum):
    """Arguments filled at each call (in this order: KernelCall's x_at, out_at, x_stride_at, stream_at)."""
    X = "x's address"
    OUT = "the output's address"
    X_STRIDE = "x's row stride"
    STREAM = "the current stream"


def _as_c(kind: type, value: object) -> object:
    """`value` as the entry point's `kind` takes it: ints as they are (ctypes passes them as C ints), the rest
    (pointers, the float scale) as ctypes values."""
    if kind is ctypes.c_int:
        if not -2**31 <= value < 2**31:
            raise ValueError(f"{value} does not fit a C int")
        return int(value)
    return kind(value)


def current_device() -> int:
    return torch.cuda.current_device()


def device_of(x: torch.Tensor) -> int:
    return x.get_device()  # -1 off CUDA


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # inductor's generated code calls it too


def current_stream(index: int) -> int:
    """The current stream's cudaStream_t on device `index`."""
    if _raw_stream is not None:
        return _raw_stream(index)
    return torch.cuda.current_stream(index).cuda_stream


class KernelCall:
    """`function` of `weight_type`'s library (cuda_build's entry points) with `arguments` in the entry point's
    order, each a value or a Slot; `holds`: the tensors whose addresses they are, kept alive with the call. A
    call takes x [rows, K] float16 on `device` and returns a new output of `out_columns` columns. x is copied
    first where the kernel cannot read it as it is: rows not 16-byte aligned (or, with `contiguous`, not
    contiguous); `gather`, where given, then turns x into the kernel's x (act_order's inputs in the stored order).
    What was bound stays: the tile, the weight's addresses, split-K's workspace and whether to launch dependent
    (QUANTBENCH_DEPENDENT_LAUNCH and inductor's setting as they were when bound)."""

    def __init__(self, weight_type: cuda_build.WeightType, arch: str, function: str, arguments: list,
                 device: torch.device, rows: int, out_columns: int, holds: tuple = (), contiguous: bool = True,
                 gather: Callable[[torch.Tensor], torch.Tensor] | None = None):
        name, types = cuda_build.SIGNATURES[function]
        if len(arguments) != len(types):
            raise ValueError(f"{name} takes {len(types)} arguments, not {len(arguments)}")
        self.name = name
        self.function = cuda_build.entry_point(weight_type, arch, function)
        self.arguments = [value if isinstance(value, Slot) else _as_c(kind, value)
                          for kind, value in zip(types, arguments)]
        self.x_at, self.out_at, self.x_stride_at, self.stream_at = (arguments.index(slot) for slot in Slot)
        self.device_index = device.index if device.index is not None else current_device()
        self.rows, self.out_columns = rows, out_columns
        self.holds = holds
        self.contiguous, self.gather = contiguous, gather

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != self.rows or x.dtype != torch.float16 or device_of(x) != self.device_index:
            raise ValueError(f"this call was bound for {self.rows} rows of float16 x on CUDA device "
                             f"{self.device_index}, not {x.shape[0]} of {x.dtype} on {x.device}")
        if current_device() != self.device_index:
            with torch.cuda.device(self.device_index):
                return self(x)
        strides = x.stride()
        if (x.data_ptr() % 16 or strides[-1] != 1 or strides[0] % 8
                or (self.contiguous and not x.is_contiguous())):  # rows read in aligned 16-byte pieces
            x = x.clone(memory_format=torch.contiguous_format)
        if self.gather is not None:
            x = self.gather(x)
        return self.launch(x, x.new_empty((self.rows, self.out_columns)))

    def launch(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The kernel on x as it is, into `out`, on the current device."""
        arguments = self.arguments.copy()
        arguments[self.x_at] = ctypes.c_void_p(x.data_ptr())
        arguments[self.out_at] = ctypes.c_void_p(out.data_ptr())
        arguments[self.x_stride_at] = x.stride(0)
        arguments[self.stream_at] = ctypes.c_void_p(current_stream(self.device_index))
        error = self.function(*arguments)
        if error:
            raise RuntimeError(f"{self.name} did not launch: cudaError {error}")
        return out

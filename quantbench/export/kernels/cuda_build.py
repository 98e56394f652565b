"""Building the CUDA kernels (`packed_gemv.cu` on CUDA cores, `packed_mma.cu` on tensor cores, `packed_wgmma.cu`
on Hopper's warpgroup tensor-core products) with nvcc, one shared library per kernel and weight type, cached on
disk and loaded through ctypes.

The cache is QUANTBENCH_CUDA_CACHE, else $XDG_CACHE_HOME/quantbench/cuda (~/.cache/…); a library's name
holds the kernel, the weight type, the GPU architecture and a digest of the sources and flags, so an
edited source is rebuilt. `python -m quantbench.export.kernels.cuda_build --arch 90` builds every library
ahead of use, on a machine without a GPU too.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import functools
import hashlib
import os
import shutil
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from quantbench.export.kernels import library_cache
from quantbench.export.kernels.layout import KIND_CODES, KernelWeight

HERE = Path(__file__).parent
HEADERS = (HERE / "packed_decode.cuh", HERE / "tensor_core_decode.cuh")
KERNELS = ("gemv", "mma", "wgmma")
CACHE_ENV = "QUANTBENCH_CUDA_CACHE"
DEPENDENT_LAUNCH_ENV = "QUANTBENCH_DEPENDENT_LAUNCH"
NO_GROUPS_SHIFT = 31  # a word row's group is row >> shift: per-channel scales are all group 0
MMA_STEP_ROWS = 4  # word rows per k-step of the tensor-core kernel
MMA_SLAB = 4  # its k-steps per load-ahead


@dataclass(frozen=True)
class WeightType:
    """What a library is compiled for."""
    kind: int
    bits: int
    zeros: bool
    perm: bool  # gemv: act_order gathered in the kernel (mma: always gathered before the call)
    flush: int  # gemv: word rows summed in float16 before their scale applies; mma: k-steps sharing a scale
    # bench/gemv_anatomy.py, a wrong result: 1 only the weight loads, nothing decoded; 2 the loads with the
    # instructions of a tensor-core decode (one LOP3 per code pair, one m16n8k16 product per 4 pairs)
    load_only: int = 0
    kernel: str = "gemv"

    @classmethod
    def of(cls, weight: KernelWeight, perm: bool, load_only: int = 0) -> WeightType:
        """The CUDA-core decode kernel's type."""
        flush = 8 if weight.group >= weight.shape[1] else min(8, weight.group // weight.per_word)
        return cls(KIND_CODES[weight.kind], weight.bits, weight.zeros is not None, perm, flush, int(load_only))

    @classmethod
    def for_mma(cls, weight: KernelWeight, scales_in_b: bool = False) -> WeightType:
        """The tensor-core kernel's type: its span, the k-steps that share one scale (at most a slab), or 0
        where groups are shorter than a k-step, for NVFP4 (its scales go into B, where they stay exact) and
        where `scales_in_b` asks for it (64-row blocks: no registers for span sums; MXFP4 only where its scales
        keep B exact, which the caller checks: cuda_mma.mx_scales_fit_b)."""
        group_rows = weight.shape[1] // weight.per_word if weight.group >= weight.shape[1] else \
            weight.group // weight.per_word
        span = 0 if scales_in_b or weight.kind == "nvfp4" or group_rows < MMA_STEP_ROWS else \
            min(MMA_SLAB, group_rows // MMA_STEP_ROWS)
        return cls(KIND_CODES[weight.kind], weight.bits, weight.zeros is not None, False, span, kernel="mma")

    @classmethod
    def for_wgmma(cls, weight: KernelWeight) -> WeightType:
        """The warpgroup kernel's type: the scales always in the weight's fragment (not MXFP4's)."""
        if weight.kind == "mxfp4":
            raise ValueError("MXFP4 scales may leave float16's range: the warpgroup kernel has no MXFP4 build")
        return cls(KIND_CODES[weight.kind], weight.bits, weight.zeros is not None, False, 0, kernel="wgmma")

    def defines(self) -> list[str]:
        common = [f"-DKIND={self.kind}", f"-DBITS={self.bits}", f"-DHAS_ZEROS={int(self.zeros)}"]
        if self.kernel in ("mma", "wgmma"):
            return [*common, f"-DSPAN={self.flush}"]
        return [*common, f"-DHAS_PERM={int(self.perm)}", f"-DFLUSH={self.flush}", f"-DLOAD_ONLY={int(self.load_only)}"]

    @property
    def source(self) -> Path:
        return HERE / f"packed_{self.kernel}.cu"


def row_shift(weight: KernelWeight) -> int:
    """log2 of the word rows per group (groups are powers of two ≥ a word's codes), or per-channel 31."""
    if weight.group >= weight.shape[1]:
        return NO_GROUPS_SHIFT
    return (weight.group // weight.per_word).bit_length() - 1


@functools.cache
def nvcc_path() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and (Path(CUDA_HOME) / "bin" / "nvcc").is_file():
        return str(Path(CUDA_HOME) / "bin" / "nvcc")
    return shutil.which("nvcc")


def unsupported_reason(x: torch.Tensor, weight: KernelWeight) -> str | None:
    """Why neither CUDA kernel takes this call, whatever its rows (None when they do)."""
    if not x.is_cuda:
        return "x is not on a CUDA device"
    if x.dtype != torch.float16:
        return f"x is {x.dtype}; the CUDA kernels multiply float16"
    if weight.kind not in KIND_CODES:
        return f"no CUDA kernel for the {weight.kind} layout"
    if weight.shape[0] % 4:
        return f"{weight.shape[0]} outputs are not a multiple of 4 (each thread loads 4 outputs' words)"
    if any(t.data_ptr() % 16 for t in weight.tensors().values()):
        return "a weight tensor is not 16-byte aligned"
    if nvcc_path() is None:
        return "no nvcc to build it with"
    return None


def cache_dir() -> Path:
    return library_cache.cache_dir(CACHE_ENV, "cuda")


def library_path(weight_type: WeightType, arch: str) -> Path:
    flags = _flags(weight_type, arch)
    sources = b"".join(path.read_bytes() for path in (weight_type.source, *HEADERS))
    digest = hashlib.sha256(sources + " ".join(flags).encode())
    t = weight_type
    name = (f"packed_{t.kernel}-k{t.kind}-b{t.bits}-z{int(t.zeros)}-p{int(t.perm)}-f{t.flush}"
            f"{('', '-load', '-mma-shaped')[t.load_only]}")
    return cache_dir() / f"{name}-sm{arch}-{digest.hexdigest()[:12]}.so"


def _flags(weight_type: WeightType, arch: str) -> list[str]:
    if weight_type.kernel == "wgmma" and arch == "90":
        arch = "90a"  # wgmma is sm_90a's alone
    return ["-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", f"-gencode=arch=compute_{arch},code=sm_{arch}",
            *weight_type.defines()]


def build(weight_type: WeightType, arch: str) -> Path:
    """The library for this weight type and architecture, compiled unless the cache has it."""
    path = library_path(weight_type, arch)
    if path.is_file():
        return path
    nvcc = nvcc_path()
    if nvcc is None:
        raise RuntimeError("building the CUDA kernels needs nvcc (CUDA_HOME or PATH)")
    return library_cache.compile_library(path, [nvcc, *_flags(weight_type, arch), str(weight_type.source)],
                                         f"{weight_type.source.name} for {weight_type}")


# Entry points: (rows, lanes/warps, threads/warps_n, async/x_shared[, capped], splits[, column blocks]) ints,
# then pointers, then sizes (gemv: and whether x goes through shared memory and whether word rows are
# streamed), whether the outputs are gated (not the warpgroup kernel), then the scale, whether to launch
# dependent and the stream; the tensor-core libraries also gather act_order's inputs (x, perm, out, M, K,
# stride, dependent, stream); the warpgroup kernel's takes (rows, warpgroups, splits), then pointers and sizes
# as the tensor-core kernel's.
SIGNATURES = {"gemv": ("quantbench_packed_gemv", [ctypes.c_int] * 6 + [ctypes.c_void_p] * 8 + [ctypes.c_int] * 9
                       + [ctypes.c_float, ctypes.c_int, ctypes.c_void_p]),
              "mma": ("quantbench_packed_mma", [ctypes.c_int] * 6 + [ctypes.c_void_p] * 7 + [ctypes.c_int] * 7
                      + [ctypes.c_float, ctypes.c_int, ctypes.c_void_p]),
              "wgmma": ("quantbench_packed_wgmma", [ctypes.c_int] * 3 + [ctypes.c_void_p] * 7 + [ctypes.c_int] * 6
                        + [ctypes.c_float, ctypes.c_int, ctypes.c_void_p]),
              "gather": ("quantbench_gather_inputs", [ctypes.c_void_p] * 3 + [ctypes.c_int] * 4 + [ctypes.c_void_p])}
_libraries: dict[tuple[WeightType, str], ctypes.CDLL] = {}
_workspaces: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_functions: dict[tuple[WeightType, str, str], ctypes._CFuncPtr] = {}
_failures: dict[tuple[WeightType, str], Exception] = {}


def entry_point(weight_type: WeightType, arch: str, function: str | None = None):
    """The library's entry point (`function` "gather": the tensor-core library's act_order gather); a failed
    build is remembered, not retried on every call."""
    key = (weight_type, arch)
    if key in _failures:
        raise _failures[key]
    if key not in _libraries:
        try:
            _libraries[key] = ctypes.CDLL(str(build(weight_type, arch)))
        except (RuntimeError, OSError) as exc:
            _failures[key] = exc
            raise
    function = function or weight_type.kernel
    if (*key, function) not in _functions:
        entry = getattr(_libraries[key], SIGNATURES[function][0])
        entry.restype = ctypes.c_int  # no argtypes: kernel_call.KernelCall converts the arguments once, when bound
        _functions[(*key, function)] = entry
    return _functions[(*key, function)]


def library_types(weight: KernelWeight) -> set[WeightType]:
    """The libraries the tile tuner may call for `weight` with the engines it times (matmul.timed_engines): the
    CUDA-core kernel's (act_order gathered in the kernel, and without, where x is gathered before), the tensor-core
    kernel's (scales applied in registers and in B), the warpgroup kernel's where named."""
    from quantbench.export.kernels.matmul import timed_engines

    if weight.kind == "ternary3":
        return set()
    engines = timed_engines()
    types = set()
    if "cuda" in engines:
        types |= {WeightType.of(weight, perm) for perm in {weight.perm is not None, False}}
    if "mma" in engines or "wgmma" in engines:  # the warpgroup kernel gathers act_order through mma's library
        types |= {WeightType.for_mma(weight, scales_in_b) for scales_in_b in (False, True)}
    if "wgmma" in engines and weight.kind != "mxfp4":
        types.add(WeightType.for_wgmma(weight))
    return types


class LibraryBuilds:
    """The CUDA libraries a model's packed layers will need, built side by side (one nvcc a core) while the model
    loads: each takes 5–30 s, and the tuner would otherwise build them one after another on the first calls."""

    def __init__(self, arch: str):
        self.arch = arch
        self.pool = ThreadPoolExecutor(os.cpu_count() or 1) if nvcc_path() else None
        self.started: dict[WeightType, Future] = {}

    def add(self, weight: KernelWeight) -> None:
        if self.pool is None:  # no nvcc: the tuner times Triton's tiles alone
            return
        for weight_type in library_types(weight) - self.started.keys():
            if not library_path(weight_type, self.arch).is_file():
                self.started[weight_type] = self.pool.submit(build, weight_type, self.arch)

    def cancel(self) -> None:
        """Builds not started are dropped; those running finish (an nvcc is not interrupted mid-file)."""
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)

    def wait(self) -> dict[WeightType, BaseException]:
        """Waits for the builds; those that failed and why, remembered as entry_point remembers a failed build
        (the tuner then skips that engine's tiles without building again)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        failures = {weight_type: future.exception() for weight_type, future in self.started.items()
                    if future.exception() is not None}
        for weight_type, exc in failures.items():
            _failures.setdefault((weight_type, self.arch), exc)
        return failures


def splits_to_fill(blocks: int, processors: int, most: int) -> int:
    """The fewest splits of K, a power of two up to `most`, that give every multiprocessor one of the blocks."""
    fill = 1
    while blocks * fill < processors and fill < most:
        fill *= 2
    return fill


def split_workspace(device: torch.device, splits: int, m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-K's float32 partial sums and zeroed arrival counts (either kernel's), one pair per device, split
    and output width, sized for every batch up to the power of two ≥ m. It is made on the first (eager) call
    of that batch size's range, the tuner's, so that no CUDA graph capture allocates it; calls sharing it run
    one after another on a stream (its counts return to zero at the end of each call)."""
    rows = 1 << (m - 1).bit_length()
    key = (device, splits, rows, n)
    if key not in _workspaces:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("split-K's workspace is made on an eager call, not inside a CUDA graph capture")
        blocks = n // 4 * rows  # at most one block per 4 outputs and row of x (either kernel)
        _workspaces[key] = (torch.empty(splits * rows * n, dtype=torch.float32, device=device),
                            torch.zeros(blocks, dtype=torch.int32, device=device))
    return _workspaces[key]


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """The CUDA device's compute capability (None for any other device)."""
    return _capability(device) if device.type == "cuda" else None


def device_arch(device: torch.device) -> str:
    major, minor = _capability(device)
    return f"{major}{minor}"


def dependent_launch(device: torch.device) -> int:
    """1 where the kernels launch to start while the stream's previous kernel finishes (programmatic
    dependent launch, sm_90 on; packed_decode.cuh). QUANTBENCH_DEPENDENT_LAUNCH=1 or 0 says so; unset (or
    "auto"), they do when inductor's Triton kernels do too (TORCHINDUCTOR_ENABLE_PDL=1): beside those an 8B
    decode ran 2–3% faster with it, beside plain kernels 2.5% slower (docs/performance.md)."""
    setting = os.environ.get(DEPENDENT_LAUNCH_ENV, "auto")
    if setting not in ("auto", "0", "1"):
        raise ValueError(f"{DEPENDENT_LAUNCH_ENV}={setting!r}: expected 1, 0 or auto")
    wanted = _inductor_launches_dependent() if setting == "auto" else setting == "1"
    return int(wanted and can_launch_dependent(device))


def can_launch_dependent(device: torch.device) -> bool:
    """Whether the device has programmatic dependent launch (sm_90 on)."""
    return _capability(device) >= (9, 0)


def _inductor_launches_dependent() -> bool:
    config = sys.modules.get("torch._inductor.config")  # not imported: nothing compiled, nothing to follow
    return bool(config is not None and getattr(config.triton, "enable_pdl", False))


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def pointer(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def every_weight_type() -> list[WeightType]:
    """The types the kernels see. CUDA cores: int 2/4/8 bits with and without zeros and act_order, at every
    scale span, ternary pairs, MXFP4 (blocks of 4 word rows), NVFP4 (2). Tensor cores: the same without
    act_order, per span of k-steps (0: scales into B, MXFP4's too); warpgroup products: those of span 0 but
    MXFP4."""
    gemv = [WeightType(0, bits, zeros, perm, flush) for bits in (2, 4, 8) for zeros in (False, True)
            for perm in (False, True) for flush in (1, 2, 4, 8)]
    gemv += [*(WeightType(1, 4, False, False, flush) for flush in (1, 2, 4, 8)),
             WeightType(2, 4, False, False, 4), WeightType(3, 4, False, False, 2)]
    mma = [WeightType(0, bits, zeros, False, span, kernel="mma") for bits in (2, 4, 8) for zeros in (False, True)
           for span in (0, 1, 2, 4)]
    mma += [*(WeightType(1, 4, False, False, span, kernel="mma") for span in (0, 1, 2, 4)),
            *(WeightType(2, 4, False, False, span, kernel="mma") for span in (0, 1)),
            WeightType(3, 4, False, False, 0, kernel="mma")]
    wgmma = [dataclasses.replace(t, kernel="wgmma") for t in mma if t.flush == 0 and t.kind != KIND_CODES["mxfp4"]]
    return gemv + mma + wgmma


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the CUDA kernels' libraries ahead of use.")
    parser.add_argument("--arch", required=True, help="compute capability without the dot: 90 for H100/H200")
    parser.add_argument("--only", nargs="+", metavar="KERNEL-KIND-BITS-ZEROS-PERM-FLUSH",
                        help="e.g. gemv-0-4-1-1-8 (int4 with zeros and act_order, 8 rows per scale), "
                             "mma-0-4-1-0-4, wgmma-0-4-1-0-0; default: all")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="nvcc processes at once")
    args = parser.parse_args()
    types = every_weight_type()
    if args.only:
        types = []
        for spec in args.only:
            kernel, *fields = spec.split("-")
            if kernel not in KERNELS or len(fields) != 5 or not all(v.isdigit() for v in fields):
                parser.error(f"{spec}: expected KERNEL-KIND-BITS-ZEROS-PERM-FLUSH, the kernel one of {KERNELS}")
            kind, bits, zeros, perm, flush = (int(v) for v in fields)
            types.append(WeightType(kind, bits, bool(zeros), bool(perm), flush, kernel=kernel))
    with ThreadPoolExecutor(args.jobs) as pool:
        for path in pool.map(lambda weight_type: build(weight_type, args.arch), types):
            print(path, flush=True)


if __name__ == "__main__":
    main()

"""The CUDA decode kernel (`packed_gemv.cu`) for 1–16 rows of float16 x: built with nvcc on first use, one
shared library per weight type, cached on disk, and called through ctypes on the current CUDA stream, so
CUDA graphs capture it like any other kernel.

The cache is QUANTBENCH_CUDA_CACHE, else $XDG_CACHE_HOME/quantbench/cuda (~/.cache/…); a library's name
holds the weight type, the GPU architecture and a digest of the source and flags, so an edited source is
rebuilt. `python -m quantbench.export.kernels.cuda_gemv --arch 90` builds every weight type ahead of use,
on a machine without a GPU too.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from quantbench.export.kernels.layout import KIND_CODES, KernelWeight, with_inputs_gathered

SOURCE = Path(__file__).with_name("packed_gemv.cu")
CACHE_ENV = "QUANTBENCH_CUDA_CACHE"
ROWS = (1, 2, 4, 8)  # rows of x per program
LANES = (4, 8, 16)  # threads along the outputs (4 outputs each)
THREADS = (128, 256, 512)  # 512 with one row of x only
ASYNC_ROWS = (1, 2)  # the cp.async variant is built for these rows per block
GATHER_BYTES = 96 << 10  # act_order: shared memory for the block's rows of x, gathered (else torch gathers)
MAX_ROWS = 16  # beyond this only the tl.dot kernel is tried
NO_GROUPS_SHIFT = 31  # a word row's group is row >> shift: per-channel scales are all group 0


@dataclass(frozen=True)
class WeightType:
    """What a library is compiled for."""
    kind: int
    bits: int
    zeros: bool
    perm: bool
    flush: int  # word rows that share a scale, summed in float16 before the scale is applied
    load_only: bool = False  # bench/gemv_anatomy.py: only the weight loads, nothing decoded (a wrong result)

    @classmethod
    def of(cls, weight: KernelWeight, perm: bool, load_only: bool = False) -> WeightType:
        group_rows = weight.group // weight.per_word
        flush = 8 if weight.group >= weight.shape[1] else min(8, group_rows)
        return cls(KIND_CODES[weight.kind], weight.bits, weight.zeros is not None, perm, flush, load_only)

    def defines(self) -> list[str]:
        return [f"-DKIND={self.kind}", f"-DBITS={self.bits}", f"-DHAS_ZEROS={int(self.zeros)}",
                f"-DHAS_PERM={int(self.perm)}", f"-DFLUSH={self.flush}", f"-DLOAD_ONLY={int(self.load_only)}"]


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
    """Why the CUDA kernel does not take this call (None when it does)."""
    if not x.is_cuda:
        return "x is not on a CUDA device"
    if x.dtype != torch.float16:
        return f"x is {x.dtype}; the CUDA kernel multiplies float16"
    if weight.kind not in KIND_CODES:
        return f"no CUDA kernel for the {weight.kind} layout"
    if x.shape[0] > MAX_ROWS:
        return f"{x.shape[0]} rows of x: the CUDA kernel takes up to {MAX_ROWS}"
    if weight.shape[0] % 4:
        return f"{weight.shape[0]} outputs are not a multiple of 4 (each thread loads 4 outputs' words)"
    if any(t.data_ptr() % 16 for t in weight.tensors().values()):
        return "a weight tensor is not 16-byte aligned"
    if nvcc_path() is None:
        return "no nvcc to build it with"
    return None


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "quantbench" / "cuda"


def library_path(weight_type: WeightType, arch: str) -> Path:
    flags = _flags(weight_type, arch)
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:12]
    t = weight_type
    name = f"packed_gemv-k{t.kind}-b{t.bits}-z{int(t.zeros)}-p{int(t.perm)}-f{t.flush}{'-load' * t.load_only}"
    return cache_dir() / f"{name}-sm{arch}-{digest}.so"


def _flags(weight_type: WeightType, arch: str) -> list[str]:
    return ["-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", f"-gencode=arch=compute_{arch},code=sm_{arch}",
            *weight_type.defines()]


def build(weight_type: WeightType, arch: str) -> Path:
    """The library for this weight type and architecture, compiled unless the cache has it."""
    path = library_path(weight_type, arch)
    if path.is_file():
        return path
    nvcc = nvcc_path()
    if nvcc is None:
        raise RuntimeError("building the CUDA kernel needs nvcc (CUDA_HOME or PATH)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        built = Path(scratch) / path.name
        result = subprocess.run([nvcc, *_flags(weight_type, arch), str(SOURCE), "-o", str(built)],
                                capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"nvcc failed on {SOURCE.name} for {weight_type}:\n{result.stderr[-4000:]}")
        os.replace(built, path)  # atomic: a concurrent process sees no library or a whole one
    return path


_functions: dict[tuple[WeightType, str], ctypes._CFuncPtr] = {}
_failures: dict[tuple[WeightType, str], Exception] = {}


def _function(weight_type: WeightType, arch: str):
    """The library's entry point; a failed build is remembered, not retried on every call."""
    key = (weight_type, arch)
    if key in _failures:
        raise _failures[key]
    if key not in _functions:
        try:
            library = ctypes.CDLL(str(build(weight_type, arch)))
        except (RuntimeError, OSError) as exc:
            _failures[key] = exc
            raise
        function = library.quantbench_packed_gemv
        function.restype = ctypes.c_int
        function.argtypes = ([ctypes.c_int] * 4 + [ctypes.c_void_p] * 6 + [ctypes.c_int] * 6
                             + [ctypes.c_float, ctypes.c_void_p])
        _functions[key] = function
    return _functions[key]


def device_arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}{minor}"


def launch(x: torch.Tensor, weight: KernelWeight, rows: int, lanes: int, threads: int, async_copies: bool = False,
           load_only: bool = False) -> torch.Tensor:
    """x [M ≤ 16, K] float16, contiguous, in the original input order → [M, N] float16. `async_copies`: the
    weights through cp.async stages in shared memory (1–2 rows) instead of registers; `load_only`: the
    weight loads alone, for timing, its result meaningless."""
    reason = unsupported_reason(x, weight)
    if reason is not None:
        raise ValueError(f"the CUDA decode kernel does not run this call: {reason}")
    if (rows not in ROWS or lanes not in LANES or threads not in THREADS or (threads == 512 and rows > 1)
            or (async_copies and rows not in ASYNC_ROWS)):
        raise ValueError(f"rows {rows}, lanes {lanes}, threads {threads}, async {async_copies}: not among {ROWS}, "
                         f"{LANES}, {THREADS} (512 threads take one row; async copies {ASYNC_ROWS} rows)")
    if rows * x.shape[1] * 2 > GATHER_BYTES:  # too many inputs to gather act_order in the kernel
        x, weight = with_inputs_gathered(x, weight)
    if x.data_ptr() % 16:
        x = x.clone()
    m, k = x.shape
    n = weight.shape[0]
    function = _function(WeightType.of(weight, weight.perm is not None, load_only), device_arch(x.device))
    out = torch.empty(m, n, dtype=torch.float16, device=x.device)
    with torch.cuda.device(x.device):
        error = function(rows, lanes, threads, int(async_copies), x.data_ptr(), _pointer(weight.perm),
                         weight.qweight.data_ptr(), weight.scales.data_ptr(), _pointer(weight.zeros), out.data_ptr(),
                         m, n, k, weight.n_groups, row_shift(weight), x.stride(0), 1.0 / weight.global_scale,
                         torch.cuda.current_stream(x.device).cuda_stream)
    if error:
        raise RuntimeError(f"the CUDA decode kernel did not launch: cudaError {error}")
    return out


def _pointer(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def every_weight_type() -> list[WeightType]:
    """The types the kernels see: int 2/4/8 bits with and without zeros and act_order, at every scale span,
    ternary pairs, MXFP4 (blocks of 4 word rows), NVFP4 (2)."""
    types = [WeightType(0, bits, zeros, perm, flush) for bits in (2, 4, 8) for zeros in (False, True)
             for perm in (False, True) for flush in (1, 2, 4, 8)]
    return [*types, *(WeightType(1, 4, False, False, flush) for flush in (1, 2, 4, 8)),
            WeightType(2, 4, False, False, 4), WeightType(3, 4, False, False, 2)]


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the CUDA decode kernel's libraries ahead of use.")
    parser.add_argument("--arch", required=True, help="compute capability without the dot: 90 for H100/H200")
    parser.add_argument("--only", nargs="+", metavar="KIND-BITS-ZEROS-PERM-FLUSH",
                        help="e.g. 0-4-1-1-8 (int4 with zeros and act_order, 8 rows per scale); default: all")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="nvcc processes at once")
    args = parser.parse_args()
    types = ([WeightType(*(int(v) for v in spec.split("-"))) for spec in args.only] if args.only
             else every_weight_type())
    with ThreadPoolExecutor(args.jobs) as pool:
        for path in pool.map(lambda weight_type: build(weight_type, args.arch), types):
            print(path, flush=True)


if __name__ == "__main__":
    main()

"""Packed matmuls on the CPU through quantbench's own C++ kernels (`packed_cpu.cpp`), for every kernel-layout kind
but base-3 ternary and any float dtype of x: up to 128–192 rows with AVX-512 (`MATMUL_ROWS`) the weight words are
decoded in vector lanes for four rows at once and never stored as floats; more rows decode a slab of inputs at a
time to float32 for torch's dense matmul (as the torch fallback does, with the decode in C++). bfloat16 x, where
the CPU has bfloat16 dot products, multiplies two codes at a time as it is (`takes_bfloat16`); on a CPU with AMX
tiles only one row does (2 to AMX_KERNEL_ROWS rows go to the float32 kernel, faster there), and beyond
AMX_KERNEL_ROWS rows the weight is decoded whole to bfloat16 for torch's bfloat16 matmul.

The library is compiled with the host's C++ compiler for this CPU (`-march=native`, or QUANTBENCH_CPU_ARCH) on
first use, against the running torch, and cached (QUANTBENCH_CPU_CACHE, else $XDG_CACHE_HOME/quantbench/cpu); a
library's name holds a digest of the source, the flags, the compiler, torch's version and the CPU's feature
flags. Where it cannot be built (no compiler), `available()` is False, one warning says why, and the torch
fallback runs.

Int and ternary weights are read as stored, nothing added; MXFP4 and NVFP4 block scales are decoded to float32
once, on the weight's first call, and kept beside its words (4 bytes a block of 32 or 16 where it stores 1).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sysconfig
import threading
import warnings
import weakref
from pathlib import Path

import torch

from quantbench.export.kernels import library_cache
from quantbench.export.kernels.layout import KIND_CODES, KernelWeight, with_inputs_gathered
from quantbench.export.kernels.reference import in_original_order
from quantbench.formats.fp import E4M3, pow2
from quantbench.formats.mx import E8M0_BIAS

SOURCE = Path(__file__).parent / "packed_cpu.cpp"
CACHE_ENV = "QUANTBENCH_CPU_CACHE"
ARCH_ENV = "QUANTBENCH_CPU_ARCH"  # the -march the library is compiled for: native unless set (x86-64-v3: AVX2)
# The most rows of x the kernel multiplies, by the library's vector width (16 floats: AVX-512, 8: AVX2, 4: SSE2 and
# others); more decode slabs for a dense matmul. Where the slabs overtook the kernel on a 4096² matmul
# (`bench/cpu_decode.py --crossing`, docs/performance.md "Packed models on the CPU"; the narrower builds measured
# on an AVX-512 CPU, whose dense matmuls stay AVX-512), since the codes are converted in place: AVX-512 int4 and
# NVFP4 beyond 192 rows, ternary about 128; AVX2 all three about 48; SSE2 int4 about 20, ternary and NVFP4 16-24.
# The slabs' time varied threefold from run to run (torch's dense matmul); these are where they ran fastest.
MATMUL_ROWS = {16: {"int": 192, "ternary": 128, "fp4": 192}, 8: {"int": 48, "ternary": 48, "fp4": 48},
               4: {"int": 20, "ternary": 16, "fp4": 16}}
# grad·W: the most rows of grad the kernel multiplies (it decodes the weight once a row) before slabs and torch's
# matmul. On a 4096² weight with AVX-512 it took 0.4–1.0 ms a row against the slabs' 2.6–3.0 ms at one row and
# 3.4–5.4 ms at four, where it was still level or ahead; and the slabs' one-row product, MKL's threaded
# matrix-vector product after the library's threads, stalled about 1 ms a slab in some processes (20 ms a call)
GRADIENT_KERNEL_ROWS = 4
SLAB_BYTES = 4 << 20  # float32 decoded at a time for a dense matmul
# bfloat16 x on a CPU with AMX tiles: the most rows the kernel multiplies before the weight is decoded whole to
# bfloat16 for torch's matmul (oneDNN on AMX, about 3 TFLOP/s on two cores of the machine measured): on a 4096²
# and a 4096×14336 weight the decoded matmul was level with the pair kernel at 32 rows (int4, NVFP4) or 16
# (ternary, two dot products a pair in the kernel) and 2–4× faster at 64, 12–23× at 1024, and behind the float32
# kernel at 32 (ternary 16), ahead at 64 (ternary 32) (docs/performance.md "bfloat16 matmuls on AMX"). Weights
# past BFLOAT16_WEIGHT_MOST values (an 8B model's packed lm_head) stay on the kernel: the buffer is held per thread.
# Below, from 2 rows on, the pair kernel's bfloat16 dot products ran 1.2–1.7× slower there than the float32 kernel
# (about level at one row), where an AMD EPYC ran them 1.5–2.4× faster: on a CPU with AMX tiles (Intel's server
# cores) bfloat16 x of 2 to AMX_KERNEL_ROWS rows is converted to float32 for the float32 kernel.
AMX_KERNEL_ROWS = {"int": 32, "ternary": 16, "fp4": 32}
BFLOAT16_WEIGHT_MOST = 1 << 27
_fp4_scales: dict[int, torch.Tensor] = {}  # id(qweight) → float32 scales of an MXFP4 or NVFP4 weight
_NO_ZEROS = torch.empty(0, dtype=torch.uint8)
_per_thread = threading.local()


def applies(x: torch.Tensor, weight: KernelWeight) -> bool:
    return x.device.type == "cpu" and x.dtype.is_floating_point and runs(weight)


def runs(weight: KernelWeight) -> bool:
    """Whether the C++ kernel multiplies this weight (a float x on the CPU given)."""
    return (weight.kind in KIND_CODES and weight.qweight.device.type == "cpu"
            and (weight.kind in ("mxfp4", "nvfp4") or weight.scales.dtype == torch.float16) and available())


def cpu_packed_matmul(x: torch.Tensor, weight: KernelWeight, path: str | None = None) -> torch.Tensor:
    """x [M, K] (original input order) → x·Wᵀ [M, N] in x's dtype, accumulated in float32; `path` "kernel",
    "slabs" or "bfloat16" (the weight decoded whole to bfloat16, x rounded to bfloat16, torch's matmul) overrides
    the choice by rows and CPU (benchmarks)."""
    x, weight = with_inputs_gathered(x, weight)
    words, scales, zeros = weight.qweight, kernel_scales(weight), _zeros(weight)
    kind, bits, group = KIND_CODES[weight.kind], weight.bits, weight.group
    if path not in (None, "kernel", "slabs", "bfloat16"):
        raise ValueError(f"path must be 'kernel', 'slabs' or 'bfloat16', not {path!r}")
    if path == "bfloat16" or (path is None and x.dtype == torch.bfloat16 and _bfloat16_matmul_pays(x, weight)):
        out = x.to(torch.bfloat16).contiguous() @ _decoded_bfloat16(weight)
        return out if out.dtype == x.dtype else out.to(x.dtype)
    pairs = x.dtype == torch.bfloat16 and takes_bfloat16(weight) and (x.shape[0] == 1 or not has_amx())
    if path == "kernel" or (path is None and (pairs or x.shape[0] <= most_kernel_rows(weight.kind))):
        out = _ops().packed_matmul(x.contiguous() if pairs else x.float().contiguous(), words, scales, zeros, kind,
                                   bits, group, in_x_dtype=True)
    else:
        x32 = x.float()
        out = torch.zeros(x.shape[0], weight.shape[0], dtype=torch.float32)
        for start, slab in _decoded_slabs(weight):
            out.addmm_(x32[:, start:start + slab.shape[0]], slab)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def cpu_packed_input_gradient(grad: torch.Tensor, weight: KernelWeight, path: str | None = None) -> torch.Tensor:
    """grad [M, N] → grad·W [M, K] in grad's dtype and the original input order (a packed layer's gradient in x): up
    to GRADIENT_KERNEL_ROWS rows multiplied by the C++ kernel's words as they are, more through slabs of inputs
    decoded by it for torch's dense matmul; `path` "kernel" or "slabs" overrides the choice (benchmarks)."""
    grad32 = grad.float().contiguous()
    if path not in (None, "kernel", "slabs"):
        raise ValueError(f"path must be 'kernel' or 'slabs', not {path!r}")
    if path == "kernel" or (path is None and grad.shape[0] <= GRADIENT_KERNEL_ROWS):
        permuted = _ops().input_gradient(grad32, weight.qweight, kernel_scales(weight), _zeros(weight),
                                         KIND_CODES[weight.kind], weight.bits, weight.group)
    else:
        permuted = torch.empty(grad.shape[0], weight.shape[1], dtype=torch.float32)
        for start, slab in _decoded_slabs(weight):
            permuted[:, start:start + slab.shape[0]] = (slab @ grad32.T).T  # the slab read in its own order
    return in_original_order(permuted, weight.perm).to(grad.dtype)


def takes_bfloat16(weight: KernelWeight) -> bool:
    """Whether the kernel multiplies bfloat16 x as it is, two codes by an x pair in one bfloat16 dot product
    (every kind but int8, where the library was compiled for a CPU with AVX512_BF16); elsewhere x is converted
    to float32 first."""
    return _takes_bfloat16(KIND_CODES[weight.kind], weight.bits)


@functools.cache
def _takes_bfloat16(kind: int, bits: int) -> bool:
    return _ops().takes_bfloat16(kind, bits)


def dense_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] · weightᵀ for a dense weight [N, K] of x's dtype (float32, or bfloat16 where
    dense_takes_bfloat16()) → float32 [M, N]: lanes along K, for a few rows of x (dense_cpu.py)."""
    return _ops().dense_matmul(x.contiguous(), weight.contiguous())


@functools.cache
def dense_takes_bfloat16() -> bool:
    """Whether dense_matmul takes bfloat16 (the library compiled for a CPU with bfloat16 dot products)."""
    return available() and _ops().dense_takes_bfloat16()


def most_kernel_rows(kind: str) -> int:
    """The most rows of float32 x the kernel multiplies before slabs and a dense matmul take over."""
    return MATMUL_ROWS[_lanes()][kind if kind in ("int", "ternary") else "fp4"]


@functools.cache
def _lanes() -> int:
    return _ops().lanes()  # floats in one of the library's vectors


def decode(weight: KernelWeight, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """float32 [stop − start, N]: the weight's stored inputs [start, stop) decoded by the C++ kernel."""
    out = torch.empty((weight.shape[1] if stop is None else stop) - start, weight.shape[0], dtype=torch.float32)
    _ops().decode(out, weight.qweight, kernel_scales(weight), _zeros(weight), KIND_CODES[weight.kind], weight.bits,
                  weight.group, start)
    return out


def _decoded_slabs(weight: KernelWeight):
    """(start, float32 [inputs, N]) for each slab of about SLAB_BYTES of the weight's stored inputs (whole words),
    decoded by the C++ kernel into one buffer, the thread's own from call to call: use each before taking the
    next."""
    n_out, n_in = weight.shape
    inputs = max(SLAB_BYTES // (4 * n_out) // weight.per_word, 1) * weight.per_word
    buffer = _slab_buffer(min(inputs, n_in) * n_out).view(min(inputs, n_in), n_out)
    scales, zeros, ops = kernel_scales(weight), _zeros(weight), _ops()
    for start in range(0, n_in, inputs):
        slab = buffer[:min(inputs, n_in - start)]
        ops.decode(slab, weight.qweight, scales, zeros, KIND_CODES[weight.kind], weight.bits, weight.group, start)
        yield start, slab


def _bfloat16_matmul_pays(x: torch.Tensor, weight: KernelWeight) -> bool:
    """Whether bfloat16 x takes the weight decoded to bfloat16 and torch's matmul: past AMX_KERNEL_ROWS rows, on
    a CPU with AMX tiles (elsewhere the pair kernel stays ahead at every batch measured), for weights of at most
    BFLOAT16_WEIGHT_MOST values."""
    kind = weight.kind if weight.kind in ("int", "ternary") else "fp4"
    return (x.shape[0] > AMX_KERNEL_ROWS[kind] and weight.shape[0] * weight.shape[1] <= BFLOAT16_WEIGHT_MOST
            and has_amx())


@functools.cache
def has_amx() -> bool:
    """Whether this CPU has AMX tiles (bfloat16 matrix products: torch's oneDNN matmuls use them)."""
    supported = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(supported is not None and supported())


def _decoded_bfloat16(weight: KernelWeight) -> torch.Tensor:
    """bfloat16 [K, N]: the whole weight decoded by the C++ kernel (slab by slab, in float32, then rounded once),
    in its stored input order, into a buffer the calling thread keeps (a fresh one faults in each page)."""
    n_out, n_in = weight.shape
    buffer = getattr(_per_thread, "bfloat16", None)
    if buffer is None or buffer.numel() < n_in * n_out:
        buffer = _per_thread.bfloat16 = torch.empty(n_in * n_out, dtype=torch.bfloat16)
    decoded = buffer[:n_in * n_out].view(n_in, n_out)
    for start, slab in _decoded_slabs(weight):
        decoded[start:start + slab.shape[0]].copy_(slab)
    return decoded


def _slab_buffer(floats: int) -> torch.Tensor:
    """float32 [floats] kept by the calling thread: a fresh 4 MB allocation is new pages from the system on every
    call, whose first writes fault (0.75 ms a slab on this project's test machine)."""
    buffer = getattr(_per_thread, "slab", None)
    if buffer is None or buffer.numel() < floats:
        buffer = _per_thread.slab = torch.empty(floats, dtype=torch.float32)
    return buffer[:floats]


def _zeros(weight: KernelWeight) -> torch.Tensor:
    return weight.zeros.contiguous() if weight.zeros is not None else _NO_ZEROS


def kernel_scales(weight: KernelWeight) -> torch.Tensor:
    """The scales the kernel reads: int and ternary as stored (float16); MXFP4 and NVFP4 decoded to float32 once,
    on the weight's first call, and kept beside its words (computed as the torch fallback computes them)."""
    if weight.kind in ("int", "ternary"):
        return weight.scales.contiguous()
    key = id(weight.qweight)
    scales = _fp4_scales.get(key)
    if scales is None:
        if weight.kind == "mxfp4":
            scales = pow2(weight.scales.to(torch.int32) - E8M0_BIAS)
        elif weight.kind == "nvfp4":
            scales = (E4M3.decode(weight.scales) / weight.global_scale).float()
        else:
            raise ValueError(f"no CPU kernel for the {weight.kind} layout")
        scales = _fp4_scales[key] = scales.contiguous()
        weakref.finalize(weight.qweight, _fp4_scales.pop, key, None)
    return scales


def cache_dir() -> Path:
    return library_cache.cache_dir(CACHE_ENV, "cpu")


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def flags() -> list[str]:
    torch_dir = Path(torch.__file__).parent
    abi = int(torch.compiled_with_cxx11_abi())
    # -fopenmp: at::parallel_for is OpenMP in torch's headers (without it, one thread); the library then
    # shares the libgomp that torch has loaded
    return ["-O3", f"-march={os.environ.get(ARCH_ENV, 'native')}", "-ffp-contract=off", "-fopenmp", "-std=c++17",
            "-shared", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-isystem", str(torch_dir / "include"),
            f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu"]


def library_path(cxx: str) -> Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    identity = [SOURCE.read_text(), *flags(), version, torch.__version__, _cpu_features(),
                sysconfig.get_platform()]
    return cache_dir() / f"packed_cpu-{hashlib.sha256(' '.join(identity).encode()).hexdigest()[:16]}.so"


def build() -> Path:
    """The library for this CPU, compiled unless the cache has it."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (c++, g++ or $CXX) to build the CPU kernels with")
    return library_cache.compile_library(library_path(cxx), [cxx, str(SOURCE), *flags()], SOURCE.name)


@functools.cache
def available() -> bool:
    """Whether the library is loaded (built first if need be); False, with one warning, where it cannot be."""
    if hasattr(torch.ops.quantbench_cpu, "packed_matmul"):
        return True
    try:
        torch.ops.load_library(str(build()))
    except (RuntimeError, OSError) as exc:
        warnings.warn(f"quantbench's CPU kernels are not available, packed layers run the slower torch fallback: "
                      f"{exc}", stacklevel=2)
        return False
    return True


def _ops():
    if not available():
        raise RuntimeError("quantbench's CPU kernels could not be built (see the warning)")
    return torch.ops.quantbench_cpu


def _cpu_features() -> str:
    """The CPU's feature flags (what -march=native compiled for), else its name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()

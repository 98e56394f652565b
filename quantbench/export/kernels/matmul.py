"""`packed_matmul`: x·Wᵀ from a kernel-layout weight, through Triton or the CUDA kernels on CUDA and torch
elsewhere.

On CUDA the first call for a (weight kind, width, group, batch bucket, N, K) times the tile candidates
(CUDA graphs on a cold L2, `graph_time_ms`) and keeps the fastest; later calls reuse it. Make that first
call before capturing a CUDA graph of your own. The choices persist across processes in a file per GPU name,
kernel code and engines (`tiles_file`: in QUANTBENCH_TILES_CACHE, default ~/.cache/quantbench/tiles), read on
the first tuning of a process and saved after each new one; QUANTBENCH_KERNEL_TILES=FILE names another file
(read when it was written on a GPU of the same name), QUANTBENCH_KERNEL_TILES=off keeps them in the process.
QUANTBENCH_KERNEL_ENGINES=triton, cuda, mma, wgmma or a comma-separated list of them sets the candidates' engines
where they apply (the CUDA decode kernel takes float16 x of up to 16 rows, the tensor-core kernels up to 64, the
warpgroup one on Hopper only); by default cuda and mma, and Triton's tiles only where neither applies (they never
won where one did, and compiling them cost a first use most of its tuning: docs/performance.md, "Triton's tiles
where a CUDA kernel applies"); the warpgroup kernel, slower than mma wherever it was measured, is timed only where
named.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import hashlib
import importlib.util
import json
import os
import re
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from quantbench.export.kernels import cpu_int4, cpu_packed, library_cache
from quantbench.export.kernels.kernel_call import KernelCall
from quantbench.export.kernels.layout import KernelWeight, with_inputs_gathered
from quantbench.export.kernels.reference import packed_matmul_reference
from quantbench.fsutil import atomic_write_path

BACKENDS = ("auto", "triton", "cuda", "mma", "wgmma", "cpu", "torch")


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # 1: the decode kernel, one row of x per program; ≥ 16: the tl.dot kernel
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 2
    expand: bool = True  # tl.dot kernel: split loaded words (else one load per row)
    half: bool = False  # int codes, float16 x: decode (and in the decode kernel multiply) in float16
    rows: int = 1  # decode kernels: rows of x per program, each weight tile decoded once for all of them
    lut: bool = False  # base-3 kernel: bytes decoded through a table of digits instead of divisions
    pairs: bool = False  # decode kernel, int4 codes, float16 x: two codes per f16x2 instruction (inline PTX)
    x_in_shared: bool = True  # "cuda": each block's x copied into shared memory first (act_order: always)
    streamed: bool = False  # "cuda", registers, 1–2 rows: each word row reloaded as soon as it is used
    overlap_gather: bool = False  # "mma", act_order: the kernel starts while its gather runs (dependent launch)
    column_blocks: int = 0  # "cuda": blocks along the outputs, even shares of ≤ block_n (0: one per block_n)
    capped: bool = False  # "mma", 32 rows, 4 warps side by side, x shared: registers capped for 16 warps an SM
    scales_in_b: bool = False  # "mma", below 64 rows: the scales go into B, not onto span sums (64 rows: always)
    engine: str = "triton"  # "cuda": packed_gemv.cu, `rows` rows of x per block, block_n / 4 threads along
    # the outputs, num_warps · 32 threads, num_stages 1: weights through cp.async stages, 0: through registers,
    # split_k blocks along K;
    # "mma": packed_mma.cu, `rows` rows of x per block, num_warps warps, block_n / 32 of them along the outputs,
    # num_stages 1: x through shared-memory stages, 0: x from global memory, split_k blocks along K;
    # "wgmma": packed_wgmma.cu, `rows` rows of x per block, num_warps / 4 warpgroups of 128 outputs each (block_n
    # in all), split_k blocks along K


CUDA_DEFAULT = TileConfig(1, 32, 0, 1, 8, num_stages=0, engine="cuda")
MMA_DEFAULT = TileConfig(1, 64, 0, 1, 8, num_stages=0, engine="mma")
WGMMA_DEFAULT = TileConfig(1, 128, 0, 1, 4, num_stages=0, engine="wgmma")


INTERPRETER_CONFIGS = {"decode": TileConfig(1, 32, 64, 2), "batch": TileConfig(16, 32, 64, 1),
                       "base3": TileConfig(1, 32, 8, 2)}
_tuned: dict[tuple, TileConfig] = {}
_from_file: set[tuple] = set()  # tiles read from a tiles file and not yet used by a call


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def packed_matmul(x: torch.Tensor, weight: KernelWeight, backend: str = "auto",
                  config: TileConfig | None = None) -> torch.Tensor:
    """x [..., K] → [..., N] in x's dtype. `backend`: auto (on CUDA the fastest of the Triton and CUDA
    kernels; on the CPU the CPU kernels where they apply, else torch), triton (also on CPU under
    TRITON_INTERPRET=1), cuda (the CUDA decode kernel: float16 x, up to 16 rows), mma (the tensor-core kernel:
    float16 x, up to 64 rows), wgmma (the warpgroup tensor-core kernel: Hopper, float16 x, up to 64 rows), cpu
    (quantbench's C++ kernels: any layout but base-3 ternary; where they cannot be built, torch's int4 kernel
    for bfloat16 x and int4 in groups of 32–256), torch."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    n_out, n_in = weight.shape
    x2 = x.reshape(-1, n_in)
    if backend == "cpu" or (backend == "auto" and x2.device.type == "cpu"):
        if cpu_packed.applies(x2, weight):
            return cpu_packed.cpu_packed_matmul(x2, weight).view(*x.shape[:-1], n_out)
        if cpu_int4.applies(x2, weight):  # where quantbench's could not be built
            return cpu_int4.cpu_int4_matmul(x2, weight).view(*x.shape[:-1], n_out)
        if backend == "cpu":
            raise ValueError("backend 'cpu' takes float x and the weight on the CPU, any kernel layout but base-3 "
                             "ternary, and a C++ compiler to build its kernels with")
    config = config or _engine_default(x2, weight, backend)
    use_triton = (backend in ("triton", "cuda", "mma", "wgmma")
                  or (backend == "auto" and x.is_cuda and triton_available()))
    if not use_triton:
        return packed_matmul_reference(x2, weight).view(*x.shape[:-1], n_out)
    weight = weight.row_major()  # the GPU kernels read rows of the whole output width
    from quantbench.export.kernels import triton_matmul

    if weight.kind == "ternary3":
        x2 = x2.contiguous()
        config = config or _config_for(x2, weight)
        out = triton_matmul.launch_base3(x2, weight, config.block_k, config.block_n, config.split_k, config.num_warps,
                                         config.rows, config.lut)
        return out.view(*x.shape[:-1], n_out)
    x2 = x2.contiguous()
    config = config or _config_for(x2, weight)
    if config.engine != "triton":
        return _kernel_call(x2, weight, config)(x2).view(*x.shape[:-1], n_out)
    if x2.shape[0] > 1:  # a batch gathers act_order once; Triton's decode gathers in the kernel
        x2, weight = with_inputs_gathered(x2, weight)
    out = triton_matmul.launch(x2, weight, config.block_m, config.block_n, config.block_k, config.split_k,
                               config.num_warps, config.num_stages, config.expand, config.half, config.rows,
                               config.pairs)
    return out.view(*x.shape[:-1], n_out)


def bind(x: torch.Tensor, weight: KernelWeight, backend: str = "auto", gated: bool = False) -> KernelCall | None:
    """The CUDA kernel's call that packed_matmul would make for x [M, K]'s rows, dtype and device, its choices
    made once (the tile tuned now if it is not yet): a KernelCall that takes x [M, K] and returns [M, N]. None where
    no CUDA kernel runs it (Triton's tile, another device, base-3 ternary). `gated` (weight from gate_up_interleaved):
    the call returns silu(gate)·up [M, N / 2], stored so by the kernel; None where the tile's engine cannot
    (GATED_ENGINES)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    x = x.reshape(-1, weight.shape[1])
    engines = backend in ("cuda", "mma", "wgmma") or (backend == "auto" and triton_available())
    if not (x.is_cuda and engines and weight.kind != "ternary3"):
        return None
    weight = weight.row_major()
    config = _engine_default(x, weight, backend) or _config_for(x.contiguous(), weight)
    if config.engine == "triton" or (gated and config.engine not in GATED_ENGINES):
        return None
    return _kernel_call(x, weight, config, gated)


BOUND_ROWS = 64  # bound_matmul binds up to the CUDA kernels' rows (cuda_mma.MAX_ROWS)
_bound_calls: dict[int, dict] = {}  # id(qweight) → {(rows, dtype, backend, kind, bits, group, global scale): (scales,
# zeros, perm, bind's call)}; an entry leaves with its qweight (weakref.finalize)


def bound_matmul(x: torch.Tensor, weight: KernelWeight, backend: str = "auto", gated: bool = False) -> torch.Tensor:
    """packed_matmul(x, weight, backend); up to BOUND_ROWS rows of x, where a CUDA kernel runs it, through `bind`'s
    call, made on the first call per qweight tensor, rows of x, dtype and backend and reused while the weight keeps
    its other tensors (scales, zeros, perm: bound again when one is replaced): after the first call only x, the
    output and the stream are passed (docs/performance.md, "Packed layers without CUDA graphs"). Eager packed
    layers and the packed_linear operators call this. Words in the CPU kernel's tiles (made only where it runs the
    weight) go straight to it with float x on the CPU, past packed_matmul's choice, as an eager layer's do.
    `gated` (a weight from gate_up_interleaved): silu(gate)·up [..., N / 2], applied by the CUDA kernel as it stores
    where its engine can (GATED_ENGINES), else by silu_and_mul after the matmul."""
    x2 = x.reshape(-1, weight.shape[1])
    if weight.tiled and backend in ("auto", "cpu") and x2.device.type == "cpu" and x2.dtype.is_floating_point:
        return _unbound(cpu_packed.cpu_packed_matmul(x2, weight).view(*x.shape[:-1], weight.shape[0]), gated)
    if x2.shape[0] > BOUND_ROWS or weight.tiled:  # tiled: row_major() makes new words, nothing to key a call on
        return _unbound(packed_matmul(x, weight, backend), gated)
    qweight = weight.qweight
    calls = _bound_calls.get(id(qweight))
    if calls is None:
        calls = _bound_calls[id(qweight)] = {}
        weakref.finalize(qweight, _bound_calls.pop, id(qweight), None)
    key = (x2.shape[0], x.dtype, backend, weight.kind, weight.bits, weight.group, weight.global_scale, gated)
    entry = calls.get(key)
    if not (entry and entry[0] is weight.scales and entry[1] is weight.zeros and entry[2] is weight.perm):
        call = bind(x2, weight, backend, gated)
        if call is not None:
            call.holds = ()  # the entry holds the tensors, qweight as its key: held by the call, it would never go
        entry = calls[key] = (weight.scales, weight.zeros, weight.perm, call)
    if entry[3] is None:
        return _unbound(packed_matmul(x, weight, backend), gated)
    out = entry[3](x2)
    return out.view(*x.shape[:-1], out.shape[-1])


GATED_ENGINES = ("cuda", "mma")  # the CUDA kernels that store silu(gate)·up themselves


def _unbound(out: torch.Tensor, gated: bool) -> torch.Tensor:
    """A matmul that no bound kernel call made, gated (silu_and_mul) where asked."""
    return silu_and_mul(out) if gated else out


def silu_and_mul(out: torch.Tensor) -> torch.Tensor:
    """silu(gate)·up of a gated matmul's outputs, gate j at column 2j and up j at 2j + 1 (gate_up_interleaved). The
    gates are made contiguous first: on the CPU silu rounds strided inputs otherwise than gate's own output."""
    return torch.nn.functional.silu(out[..., 0::2].contiguous()) * out[..., 1::2]


def _engine_default(x: torch.Tensor, weight: KernelWeight, backend: str) -> TileConfig | None:
    """The tile a CUDA engine named by `backend` runs untuned (None for the other backends)."""
    if backend == "cuda":
        return dataclasses.replace(CUDA_DEFAULT, rows=min(_bucket(x.shape[0]), 8))
    if backend in ("mma", "wgmma"):
        from quantbench.export.kernels.cuda_mma import rows_for

        default = MMA_DEFAULT if backend == "mma" else WGMMA_DEFAULT
        return dataclasses.replace(default, rows=rows_for(x.shape[0], weight))
    return None


def _kernel_call(x: torch.Tensor, weight: KernelWeight, config: TileConfig, gated: bool = False) -> KernelCall:
    """The call of the CUDA kernel that `config` names (its engine cuda, mma or wgmma; `gated`: cuda or mma)."""
    from quantbench.export.kernels import cuda_gemv, cuda_mma, cuda_wgmma

    if config.engine == "cuda":  # gathers act_order in shared memory
        return cuda_gemv.bind(x, weight, config.rows, config.block_n // 4, 32 * config.num_warps,
                              async_copies=config.num_stages > 0, splits=config.split_k,
                              x_in_shared=config.x_in_shared, streamed=config.streamed,
                              column_blocks=config.column_blocks, gated=gated)
    if gated and config.engine not in GATED_ENGINES:
        raise ValueError(f"engine {config.engine!r} does not store gated outputs")
    if config.engine == "mma":  # gathers act_order before the kernel
        return cuda_mma.bind(x, weight, config.rows, config.num_warps, config.block_n // 32,
                             x_shared=config.num_stages > 0, overlap_gather=config.overlap_gather,
                             splits=config.split_k, capped=config.capped, gated=gated,
                             scales_in_b=config.scales_in_b)
    if config.engine == "wgmma":  # gathers act_order before the kernel
        return cuda_wgmma.bind(x, weight, config.rows, config.num_warps // 4, config.split_k,
                               overlap_gather=config.overlap_gather)
    raise ValueError(f"engine {config.engine!r} has no CUDA kernel")


def _candidates(m: int, weight: KernelWeight, dtype: torch.dtype) -> list[TileConfig]:
    if weight.kind == "ternary3":  # block_k counts byte rows of a group here: the power of two ≥ them, ≤ 64
        bytes_per_group = -(-weight.group // 5)
        byte_rows = min(1 << (bytes_per_group - 1).bit_length(), 64)
        rows = min(_bucket(m), 8)
        return [TileConfig(1, bn, byte_rows, sk, 4, rows=rows, lut=lut) for bn in (32, 64, 128)
                for sk in (1, 2, 4, 8) for lut in (False, True)]
    if m == 1:
        tiles = [(512, 32, 4), (256, 64, 4), (128, 128, 4), (512, 64, 8)]
        modes = [dict(half=True), dict(half=False)]
        if weight.kind == "int" and weight.bits == 4 and dtype == torch.float16:
            modes.append(dict(pairs=True))
        return [TileConfig(1, bn, bk, sk, warps, 2, **mode) for bk, bn, warps in tiles for sk in (1, 2, 4, 8)
                for mode in modes]
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    splits = (1, 2, 4) if m <= 64 else (1,)
    half = weight.kind == "int" and dtype == torch.float16  # the same weights as float32 decoding, bit for bit
    dot = [TileConfig(block_m, bn, bk, sk, 4, 3, expand, half) for bn in (64, 128) for bk in (64, 128)
           for sk in splits for expand in (True, False)]
    if m > 16:
        return dot
    rows = min(_bucket(m), 8)  # decode every weight tile once for up to 8 rows: tensor cores idle, no layout shuffles
    tiles = [(256, 32, 4), (128, 64, 4), (128, 128, 8)] if rows <= 4 else [(128, 32, 4), (64, 64, 4)]
    return dot + [TileConfig(1, bn, bk, sk, warps, 2, rows=rows) for bk, bn, warps in tiles for sk in (1, 2, 4, 8)]


def _engine_candidates(x: torch.Tensor, weight: KernelWeight) -> list[TileConfig]:
    """The tiles to time: the CUDA kernels' where they apply, else Triton's. QUANTBENCH_KERNEL_ENGINES names
    the engines (default DEFAULT_ENGINES); Triton's are timed beside CUDA ones only where it names "triton", and
    stay where none of the CUDA ones it names applies."""
    engines = timed_engines()
    cuda = ((_cuda_candidates(x, weight) if "cuda" in engines else [])
            + (_mma_candidates(x, weight) if "mma" in engines else [])
            + (_wgmma_candidates(x, weight) if "wgmma" in engines else []))
    if cuda and "triton" not in engines:
        return cuda
    return _candidates(x.shape[0], weight, x.dtype) + cuda


def _cuda_candidates(x: torch.Tensor, weight: KernelWeight) -> list[TileConfig]:
    from quantbench.export.kernels import cuda_gemv

    if weight.kind == "ternary3" or cuda_gemv.unsupported_reason(x, weight) is not None:
        return []
    m = x.shape[0]
    most = min(_bucket(m), 8)  # also half as many rows per block: more blocks, fewer registers
    processors = cuda_gemv.multiprocessors(x.device)
    loads = {"registers": (0, False), "streamed": (0, True), "cp.async": (1, False)}
    return [TileConfig(1, 4 * lanes, 0, splits, threads // 32, stages, rows=rows, x_in_shared=held,
                       streamed=streamed, column_blocks=blocks, engine="cuda")
            for rows in sorted({most, max(most // 2, 1)}) for lanes in cuda_gemv.LANES
            for threads in cuda_gemv.THREADS if rows == 1 or threads < 512
            for load, (stages, streamed) in loads.items()
            if load == "registers" or rows in (cuda_gemv.STREAMED_ROWS if streamed else cuda_gemv.ASYNC_ROWS)
            for splits in cuda_gemv.split_choices(m, weight, rows, lanes, threads, processors)
            for blocks in cuda_gemv.column_block_choices(weight.shape[0], lanes, -(-m // rows) * splits, processors)
            for held in cuda_gemv.x_choices(weight)]


def _mma_candidates(x: torch.Tensor, weight: KernelWeight) -> list[TileConfig]:
    from quantbench.export.kernels import cuda_gemv, cuda_mma

    if weight.kind == "ternary3" or cuda_mma.unsupported_reason(x, weight) is not None:
        return []
    # also 16-row blocks (beside 8: other registers and schedule; beside 32 and 64: more blocks, fewer
    # registers) and 32 beside 64 (span sums, which 64-row blocks have no registers for); x from global or
    # shared memory
    # act_order: also with the kernel started while its gather runs (faster at some shapes, slower at others)
    m = x.shape[0]
    rows = sorted({cuda_mma.rows_for(m, weight), 16} | ({32} if m > 32 else set()))
    overlaps = _gather_overlaps(x, weight)
    processors = cuda_gemv.multiprocessors(x.device)
    return [TileConfig(1, 32 * warps_n, 0, splits, warps, x_shared, rows=r, overlap_gather=overlap, capped=capped,
                       scales_in_b=in_b, engine="mma")
            for r in rows for warps in cuda_mma.WARPS for warps_n in cuda_mma.WARPS_N if warps_n <= warps
            for x_shared in (0, 1) for capped in cuda_mma.capped_choices(r, warps_n, bool(x_shared), weight)
            for splits in cuda_mma.split_choices(m, weight, r, warps, warps_n, processors)
            for overlap in overlaps for in_b in cuda_mma.scales_in_b_choices(r, weight)]


def _wgmma_candidates(x: torch.Tensor, weight: KernelWeight) -> list[TileConfig]:
    from quantbench.export.kernels import cuda_gemv, cuda_mma, cuda_wgmma

    if weight.kind == "ternary3" or cuda_wgmma.unsupported_reason(x, weight) is not None:
        return []
    m = x.shape[0]
    rows = cuda_mma.rows_for(m, weight)
    overlaps = _gather_overlaps(x, weight)
    processors = cuda_gemv.multiprocessors(x.device)
    return [TileConfig(1, cuda_wgmma.OUTPUTS_PER_GROUP * groups, 0, splits, 4 * groups, 0, rows=rows,
                       overlap_gather=overlap, engine="wgmma")
            for groups in cuda_wgmma.GROUPS for splits in cuda_wgmma.split_choices(m, weight, rows, groups, processors)
            for overlap in overlaps]


def _gather_overlaps(x: torch.Tensor, weight: KernelWeight) -> tuple[bool, ...]:
    """Whether a tensor-core kernel may start while act_order's gather runs: both ways where the device can."""
    from quantbench.export.kernels import cuda_build

    return (False, True) if weight.perm is not None and cuda_build.can_launch_dependent(x.device) else (False,)


def tuned_configs() -> dict[tuple, TileConfig]:
    """The tile chosen so far per tuning_key."""
    return dict(_tuned)


TUNING_KEY_LENGTH = 9


def tuning_key(x: torch.Tensor, weight: KernelWeight) -> tuple:
    """What a tuned tile is chosen for: (kind, bits, group, has zeros, x dtype, batch bucket, N, K, act_order).
    act_order counts: its kernels gather x, so the fastest tile need not be the same weight's without it."""
    return (weight.kind, weight.bits, weight.group, weight.zeros is not None, x.dtype, _bucket(x.shape[0]),
            *weight.shape, weight.perm is not None)


def _bucket(m: int) -> int:
    return 1 if m == 1 else 1 << (m - 1).bit_length()


TILES_ENV = "QUANTBENCH_KERNEL_TILES"
TILES_CACHE_ENV = "QUANTBENCH_TILES_CACHE"
ENGINES_ENV = "QUANTBENCH_KERNEL_ENGINES"
DEFAULT_ENGINES = "cuda,mma"  # Triton where neither applies; wgmma where named (module docstring)
_loaded: set[Path] = set()


def timed_engines() -> set[str]:
    """The engines whose tiles the tuner times where they apply: QUANTBENCH_KERNEL_ENGINES, else DEFAULT_ENGINES."""
    return set(os.environ.get(ENGINES_ENV, DEFAULT_ENGINES).split(","))


def tiles_file(device: torch.device) -> Path | None:
    """Where tuned tiles persist: QUANTBENCH_KERNEL_TILES (None if "off"), else a file in the tiles cache named
    by the GPU and a digest of the kernels' code (this package's sources), the engines timed and torch's
    version, so that a change to any of them tunes afresh."""
    asked = os.environ.get(TILES_ENV)
    if asked == "off":
        return None
    if asked:
        return Path(asked)
    engines = os.environ.get(ENGINES_ENV, DEFAULT_ENGINES)
    digest = hashlib.sha256(f"{_sources_digest()} {engines} {torch.__version__}".encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9.-]+", "-", torch.cuda.get_device_name(device))
    return library_cache.cache_dir(TILES_CACHE_ENV, "tiles") / f"{name}-{digest}.json"


@functools.cache
def _sources_digest() -> str:
    digest = hashlib.sha256()
    for source in sorted(Path(__file__).parent.glob("*.[cp]*")):  # .cu, .cuh, .py, .cpp
        digest.update(source.name.encode() + source.read_bytes())
    return digest.hexdigest()


def save_tuned(path: str | Path, device_name: str) -> None:
    """Write the tiles chosen so far, for GPUs named `device_name`, beside those the file holds from other
    processes; in one rename, so that a process reading it never sees half a file."""
    path = Path(path)
    entries = {json.dumps(entry["key"]): entry for entry in _saved_entries(path, device_name)}
    for key, config in _tuned.items():
        stored = [*key[:4], str(key[4]).removeprefix("torch."), *key[5:]]
        entries[json.dumps(stored)] = {"key": stored, "tile": dataclasses.asdict(config)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write_path(path) as scratch:
        scratch.write_text(json.dumps({"device": device_name, "tiles": list(entries.values())}, indent=1) + "\n")


def _saved_entries(path: Path, device_name: str) -> list[dict]:
    """The entries of a tiles file written for `device_name` ([] if there is none, or it is another GPU's or
    not a tiles file)."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return saved.get("tiles", []) if isinstance(saved, dict) and saved.get("device") == device_name else []


def load_tuned(path: str | Path, device_name: str) -> int:
    """Take the tiles a file holds if it was written for `device_name` (tiles tuned on another GPU are not
    this one's); returns how many were taken."""
    path = Path(path)
    if not path.is_file():
        return 0
    try:
        saved = json.loads(path.read_text())
    except ValueError:
        warnings.warn(f"{path} is not a tiles file (unreadable JSON): tuning afresh", RuntimeWarning, stacklevel=2)
        return 0
    if saved.get("device") != device_name:
        warnings.warn(f"{path} holds kernel tiles tuned on {saved.get('device')}, not {device_name}: tuning afresh",
                      RuntimeWarning, stacklevel=2)
        return 0
    fields = {field.name for field in dataclasses.fields(TileConfig)}
    taken = [entry for entry in saved["tiles"]
             if len(entry["key"]) == TUNING_KEY_LENGTH and set(entry["tile"]) <= fields]
    for entry in taken:
        key = (*entry["key"][:4], getattr(torch, entry["key"][4]), *entry["key"][5:])
        if key not in _tuned:
            _tuned[key] = TileConfig(**entry["tile"])
            _from_file.add(key)
    if len(taken) < len(saved["tiles"]):
        warnings.warn(f"{path}: {len(saved['tiles']) - len(taken)} of its tiles were written by another version of "
                      f"quantbench (another key or other tile fields): those shapes are tuned afresh", RuntimeWarning,
                      stacklevel=2)
    return len(taken)


def chosen_tile(x: torch.Tensor, weight: KernelWeight) -> TileConfig:
    """The tile `packed_matmul(x, weight)` runs (tuned on the first CUDA call)."""
    return _config_for(x.reshape(-1, weight.shape[1]), weight)


def _config_for(x: torch.Tensor, weight: KernelWeight) -> TileConfig:
    m = x.shape[0]
    if not x.is_cuda:
        return INTERPRETER_CONFIGS["base3" if weight.kind == "ternary3" else "decode" if m == 1 else "batch"]
    key = tuning_key(x, weight)
    if key in _tuned and key not in _from_file:
        return _tuned[key]
    # the tile file is read and written only here, never on a call already tuned
    device_name, tiles = torch.cuda.get_device_name(x.device), tiles_file(x.device)
    if tiles and tiles not in _loaded:
        _loaded.add(tiles)
        load_tuned(tiles, device_name)
    if key in _from_file:  # read from a file, first used here: dropped if its engine cannot take the call here
        _from_file.discard(key)
        if _refused(x, weight, _tuned[key]):
            del _tuned[key]
    if key not in _tuned:
        _tuned[key] = _fastest(x, weight, _engine_candidates(x, weight))
        if tiles:
            save_tuned(tiles, device_name)
    return _tuned[key]


def _refused(x: torch.Tensor, weight: KernelWeight, config: TileConfig) -> str | None:
    """Why `config`'s engine cannot take this call here (no nvcc, a misaligned tensor, too many rows…): host
    checks only, so a call inside a CUDA graph capture may make them."""
    from quantbench.export.kernels import cuda_gemv, cuda_mma, cuda_wgmma

    checks = {"cuda": cuda_gemv.unsupported_reason, "mma": cuda_mma.unsupported_reason,
              "wgmma": cuda_wgmma.unsupported_reason}
    return checks[config.engine](x, weight) if config.engine in checks else None


SCREEN_CALLS = 4  # calls per CUDA graph of the screening: one round each
FINALISTS = 8  # the screening's fastest, timed in full (graph_time_ms's 10 calls, median of 3 rounds)


def _fastest(x: torch.Tensor, weight: KernelWeight, candidates: list[TileConfig],
             finalists: int | None = FINALISTS) -> TileConfig:
    """The fastest candidate among those that compile, fit the device and agree with the torch fallback
    (max |difference| within 5% of max |result|: float16 rounding is far below, a wrong kernel far above).
    Where more than `finalists` run, each is first timed once on short graphs and only the `finalists` fastest
    are timed in full (None: every candidate in full)."""
    error, disagreeing, runnable = None, [], []
    expected = packed_matmul_reference(x.float(), weight)
    tolerance = 0.05 * expected.abs().max().item()
    for config in candidates:
        def call(config=config):
            return packed_matmul(x, weight, "triton", config)
        try:
            got = call()
        except Exception as exc:  # a tile that does not fit this GPU's shared memory or registers
            error = exc
            continue
        if not (got.float() - expected).abs().max().item() <= tolerance:
            disagreeing.append(config)
            error = RuntimeError(f"{config} disagrees with the torch fallback")
            continue
        runnable.append((config, call))
    if disagreeing:
        warnings.warn(f"{len(disagreeing)} tile configurations of the {weight.kind} matmul of shape {weight.shape} "
                      f"disagree with the torch fallback and were skipped: {disagreeing}", RuntimeWarning, stacklevel=2)
    if finalists is not None and len(runnable) > finalists:
        screened = _timed(runnable, x, calls=SCREEN_CALLS, rounds=1)
        runnable = [item for _, item in sorted(screened, key=lambda pair: pair[0])[:finalists]]
    timed = _timed(runnable, x)
    if not timed:
        raise RuntimeError(f"no tile configuration runs a {weight.kind} matmul of shape {weight.shape}: "
                           f"{error or 'no launch could be captured in a CUDA graph'}")
    return min(timed, key=lambda pair: pair[0])[1][0]


def _timed(runnable: list[tuple], x: torch.Tensor, **timing) -> list[tuple[float, tuple]]:
    """(ms, (config, call)) of each call whose launches a CUDA graph can capture."""
    timed = []
    for item in runnable:
        try:
            timed.append((graph_time_ms(item[1], warm=(x,), **timing), item))
        except RuntimeError:  # a launch refused inside the capture: not a tile for this process
            continue
    return timed


_L2_FLUSH_BYTES = 128 << 20


def graph_time_ms(fn, calls: int = 10, rounds: int = 3, warm: tuple[torch.Tensor, ...] = ()) -> float:
    """GPU milliseconds of one call on a cold L2 cache (a model's layers never find their weights
    cached), without host launch overhead: CUDA graphs of `calls` × (flush, call) and of `calls` × flush,
    the difference per call, median of `rounds`. `warm`: tensors read back into L2 after each flush, in both
    graphs (a decode step's activations were written by the kernel before, so they are cached; only the
    weights come from memory)."""
    scratch = torch.ones(_L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    fn()  # compiled and tuned outside the capture

    def flush():  # reads, so it leaves no dirty lines to write back
        scratch.max()
        for tensor in warm:
            tensor.max()

    with_call, flush_only = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with _no_garbage_collection(), torch.cuda.graph(with_call):
        for _ in range(calls):
            flush()
            fn()
    with _no_garbage_collection(), torch.cuda.graph(flush_only):
        for _ in range(calls):
            flush()
    differences = []
    for _ in range(rounds):
        differences.append((_replay_ms(with_call) - _replay_ms(flush_only)) / calls)
    return sorted(differences)[len(differences) // 2]


@contextlib.contextmanager
def _no_garbage_collection():
    """Python's cycle collector held off during a capture: a dead CUDA graph it frees there (one kept alive by a
    reference cycle, such as a caught exception's traceback) resets itself inside the capture and invalidates it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _replay_ms(graph: torch.cuda.CUDAGraph) -> float:
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    graph.replay()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop)

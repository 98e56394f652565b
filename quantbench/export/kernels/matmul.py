"""`packed_matmul`: x·Wᵀ from a kernel-layout weight, through Triton on CUDA and torch elsewhere.

On CUDA the first call for a (weight kind, width, group, batch bucket, N, K) times the tile candidates
(CUDA graphs on a cold L2, `graph_time_ms`) and keeps the fastest; later calls reuse it. Make that first
call before capturing a CUDA graph of your own.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass

import torch

from quantbench.export.kernels.layout import KernelWeight
from quantbench.export.kernels.reference import packed_matmul_reference

BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # 1: the decode kernel, one row of x per program; ≥ 16: the tl.dot kernel
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 2
    expand: bool = True  # tl.dot kernel: split loaded words (else one load per row)
    half: bool = False  # decode kernel, int codes, float16 x: decode and multiply in float16


INTERPRETER_CONFIGS = {"decode": TileConfig(1, 32, 64, 2), "batch": TileConfig(16, 32, 64, 1),
                       "base3": TileConfig(1, 32, 8, 2)}
_tuned: dict[tuple, TileConfig] = {}


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def packed_matmul(x: torch.Tensor, weight: KernelWeight, backend: str = "auto",
                  config: TileConfig | None = None) -> torch.Tensor:
    """x [..., K] → [..., N] in x's dtype. `backend`: auto (Triton on CUDA, torch otherwise), triton
    (also on CPU under TRITON_INTERPRET=1), torch."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    n_out, n_in = weight.shape
    x2 = x.reshape(-1, n_in)
    use_triton = backend == "triton" or (backend == "auto" and x.is_cuda and triton_available())
    if not use_triton:
        return packed_matmul_reference(x2, weight).view(*x.shape[:-1], n_out)
    from quantbench.export.kernels import triton_matmul

    if weight.kind == "ternary3":
        x2 = x2.contiguous()
        config = config or _config_for(x2, weight)
        out = triton_matmul.launch_base3(x2, weight, config.block_k, config.block_n, config.split_k, config.num_warps)
        return out.view(*x.shape[:-1], n_out)
    if weight.perm is not None and x2.shape[0] > 1:  # a batch gathers once; decode gathers in the kernel
        x2 = x2[:, weight.perm.long()]
        weight = dataclasses.replace(weight, perm=None)
    x2 = x2.contiguous()
    config = config or _config_for(x2, weight)
    out = triton_matmul.launch(x2, weight, config.block_m, config.block_n, config.block_k, config.split_k,
                               config.num_warps, config.num_stages, config.expand, config.half)
    return out.view(*x.shape[:-1], n_out)


def _candidates(m: int, weight: KernelWeight) -> list[TileConfig]:
    if weight.kind == "ternary3":  # block_k counts byte rows of a group here: the power of two ≥ them, ≤ 64
        bytes_per_group = -(-weight.group // 5)
        rows = min(1 << (bytes_per_group - 1).bit_length(), 64)
        return [TileConfig(1, bn, rows, sk, warps) for bn in (32, 64, 128) for sk in (1, 2, 4, 8) for warps in (4, 8)]
    if m == 1:
        tiles = [(512, 32, 4), (256, 64, 4), (128, 128, 4), (512, 64, 8)]
        return [TileConfig(1, bn, bk, sk, warps, 2, True, half) for bk, bn, warps in tiles for sk in (1, 2, 4, 8)
                for half in (True, False)]
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    splits = (1, 2, 4) if m <= 64 else (1,)
    return [TileConfig(block_m, bn, bk, sk, 4, 3) for bn in (64, 128) for bk in (64, 128) for sk in splits]


def _bucket(m: int) -> int:
    return 1 if m == 1 else 1 << (m - 1).bit_length()


def _config_for(x: torch.Tensor, weight: KernelWeight) -> TileConfig:
    m = x.shape[0]
    if not x.is_cuda:
        return INTERPRETER_CONFIGS["base3" if weight.kind == "ternary3" else "decode" if m == 1 else "batch"]
    key = (weight.kind, weight.bits, weight.group, weight.zeros is not None, x.dtype, _bucket(m), *weight.shape)
    if key not in _tuned:
        _tuned[key] = _fastest(x, weight, _candidates(m, weight))
    return _tuned[key]


def _fastest(x: torch.Tensor, weight: KernelWeight, candidates: list[TileConfig]) -> TileConfig:
    best, best_ms, error = None, float("inf"), None
    for config in candidates:
        def call():
            packed_matmul(x, weight, "triton", config)
        try:
            call()
        except Exception as exc:  # a tile that does not fit this GPU's shared memory or registers
            error = exc
            continue
        ms = graph_time_ms(call)
        if ms < best_ms:
            best, best_ms = config, ms
    if best is None:
        raise RuntimeError(f"no tile configuration runs a {weight.kind} matmul of shape {weight.shape}: {error}")
    return best


_L2_FLUSH_BYTES = 128 << 20


def graph_time_ms(fn, calls: int = 10, rounds: int = 3) -> float:
    """GPU milliseconds of one call on a cold L2 cache (a model's layers never find their weights
    cached), without host launch overhead: CUDA graphs of `calls` × (flush, call) and of `calls` × flush,
    the difference per call, median of `rounds`."""
    scratch = torch.ones(_L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    fn()  # compiled and tuned outside the capture
    with_call, flush_only = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(with_call):  # the flush reads, so it leaves no dirty lines to write back
        for _ in range(calls):
            scratch.max()
            fn()
    with torch.cuda.graph(flush_only):
        for _ in range(calls):
            scratch.max()
    differences = []
    for _ in range(rounds):
        differences.append((_replay_ms(with_call) - _replay_ms(flush_only)) / calls)
    return sorted(differences)[len(differences) // 2]


def _replay_ms(graph: torch.cuda.CUDAGraph) -> float:
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    graph.replay()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop)

r"""Two builds of packed_mma.cu side by side in one process: for each cell, the tensor-core tuner's fastest uncapped
tile with the current build (of the `--rows` candidates; checked against the torch fallback), then that tile with each
build and fp16 `torch.matmul` timed alternately (bench/kernel_speed.py's timer: CUDA graphs, cold L2, x cached).
A build replaces the library of its weight type for the calls timed with it. Libraries of another version of the
source, for the weight types the variants use:

    git show REV:quantbench/export/kernels/packed_mma.cu > /tmp/old/packed_mma.cu   # and its headers beside it
    nvcc -O3 -std=c++17 -shared -Xcompiler -fPIC -gencode=arch=compute_90,code=sm_90 -DKIND=0 -DBITS=4 \
        -DHAS_ZEROS=1 -DSPAN=0 /tmp/old/packed_mma.cu -o /tmp/old/mma-0-4-1-0-0.so
    python bench/mma_builds.py --old /tmp/old --variants int4-g128 --batches 64

(`--old DIR` holds one library per weight type, named mma-KIND-BITS-ZEROS-0-SPAN.so as cuda_build's --only.)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_speed import SHAPES, VARIANTS, Timer, kernel_weight  # noqa: E402
from kernel_tiles import alternated  # noqa: E402

from quantbench.export.kernels import cuda_build, packed_matmul  # noqa: E402
from quantbench.export.kernels.cuda_build import WeightType  # noqa: E402
from quantbench.export.kernels.matmul import _fastest, _mma_candidates  # noqa: E402


@functools.cache
def _entry(path: Path):
    entry = getattr(ctypes.CDLL(str(path)), cuda_build.SIGNATURES["mma"][0])
    entry.restype = ctypes.c_int  # as cuda_build's entry points: KernelCall passes C-typed arguments
    return entry


@contextlib.contextmanager
def library(path: Path, weight_type: WeightType, arch: str):
    """Calls of `weight_type`'s tensor-core kernel go to the library at `path` inside the block (loaded once)."""
    entry = _entry(path)
    key = (weight_type, arch, "mma")
    cuda_build.entry_point(weight_type, arch)  # the current build loaded first, so that it can be put back
    current = cuda_build._functions[key]
    cuda_build._functions[key] = entry
    try:
        yield
    finally:
        cuda_build._functions[key] = current


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True, help="folder of the other build's libraries")
    parser.add_argument("--shapes", nargs="+", default=[f"{k}x{n}" for k, n in SHAPES], help="KxN (inputs×outputs)")
    parser.add_argument("--batches", nargs="+", type=int, default=[64])
    parser.add_argument("--rows", type=int, default=64, help="rows per block of the tiles compared")
    parser.add_argument("--split-k", type=int, help="only tiles with this many blocks along K (default: any)")
    parser.add_argument("--variants", nargs="+", default=["int4-g128"], choices=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the builds and fp16")
    parser.add_argument("--json", type=Path, help="written after every cell")
    args = parser.parse_args()
    timer, cells = Timer(10), []
    arch = cuda_build.device_arch(torch.device("cuda"))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {args.rows}-row tiles, old build {args.old}")
    for shape in args.shapes:
        k, n = map(int, shape.split("x"))
        dense = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
        for label in args.variants:
            weight = kernel_weight(label, n, k, "cuda")
            weight_type = WeightType.for_mma(weight, scales_in_b=args.rows == 64)
            old = args.old / (f"mma-{weight_type.kind}-{weight_type.bits}-{int(weight_type.zeros)}-0-"
                              f"{weight_type.flush}.so")
            for batch in args.batches:
                x = torch.randn(batch, k, device="cuda", dtype=torch.float16)
                tiles = [c for c in _mma_candidates(x, weight) if c.rows == args.rows and not c.capped
                         and args.split_k in (None, c.split_k)]
                if not tiles:
                    print(f"{shape} {label} batch {batch}: no {args.rows}-row tile with split_k {args.split_k}")
                    continue
                tile = _fastest(x, weight, tiles)
                with library(old, weight_type, arch):  # the old build agrees with the fallback too
                    _fastest(x, weight, [tile])
                def with_old_build():
                    with library(old, weight_type, arch):
                        return packed_matmul(x, weight, config=tile)

                times = alternated({"fp16": lambda: torch.matmul(x, dense.t()),
                                    "new": lambda: packed_matmul(x, weight, config=tile), "old": with_old_build},
                                   x, timer, args.rounds)
                us = {key: statistics.median(v) for key, v in times.items()}
                cells.append({"shape": shape, "variant": label, "batch": batch, "us": us,
                              "spread": {key: [min(v), max(v)] for key, v in times.items()}, "tile": tile.__dict__})
                print(f"{shape} {label} batch {batch}: fp16 {us['fp16']:.1f} µs; old {us['old']:.1f} µs "
                      f"(×{us['fp16'] / us['old']:.2f} fp16); new {us['new']:.1f} µs (×{us['fp16'] / us['new']:.2f}); "
                      f"new/old {us['new'] / us['old']:.3f}; tile warps {tile.num_warps} block_n {tile.block_n} "
                      f"x_shared {tile.num_stages} capped {tile.capped} split_k {tile.split_k}", flush=True)
                if args.json:
                    args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "cells": cells},
                                                    indent=1) + "\n")


if __name__ == "__main__":
    main()

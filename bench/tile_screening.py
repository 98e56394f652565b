"""Whether screening the tile candidates pays: the tuner's two ways over the same candidates (every tile timed in
full, or each timed once on short graphs and the FINALISTS fastest in full), the seconds each took, then both
winners and fp16 torch.matmul timed alternately in one run (cold L2, CUDA graphs: bench/kernel_speed.py's timer).
Every candidate is called once first, so neither way pays a library's first load.

    python bench/tile_screening.py --shapes 4096x6144 14336x4096 --batches 1 8 --variants int4-g128 \
        --json screening.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_speed import SHAPES, VARIANTS, Timer  # noqa: E402
from kernel_tiles import alternated, matmul_cells  # noqa: E402

from quantbench.export.kernels import packed_matmul  # noqa: E402
from quantbench.export.kernels.matmul import FINALISTS, _engine_candidates, _fastest  # noqa: E402


def tuned(x: torch.Tensor, weight, candidates, finalists) -> tuple[object, float]:
    """The tuner's tile and the seconds it took."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    tile = _fastest(x, weight, candidates, finalists=finalists)
    torch.cuda.synchronize()
    return tile, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=[f"{k}x{n}" for k, n in SHAPES], help="KxN (inputs×outputs)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--variants", nargs="+", default=["int4-g128"], choices=list(VARIANTS))
    parser.add_argument("--repeat", type=int, default=10, help="calls per CUDA graph")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the winners and fp16")
    parser.add_argument("--json", type=Path, help="written after every cell")
    args = parser.parse_args()
    timer, cells = Timer(args.repeat), []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {FINALISTS} finalists")
    for shape, label, batch, dense, weight, x in matmul_cells(args.shapes, args.variants, args.batches):
        candidates = _engine_candidates(x, weight)
        for config in candidates:  # libraries loaded and Triton's tiles compiled before either way
            try:
                packed_matmul(x, weight, "triton", config)
            except Exception:  # noqa: BLE001 - a tile that does not fit: both ways skip it
                pass
        full, full_s = tuned(x, weight, candidates, None)
        screened, screened_s = tuned(x, weight, candidates, FINALISTS)
        calls = {"fp16": lambda: torch.matmul(x, dense.t()),
                 "full": lambda: packed_matmul(x, weight, config=full),
                 "screened": lambda: packed_matmul(x, weight, config=screened)}
        times = alternated(calls, x, timer, args.rounds)
        us = {key: statistics.median(v) for key, v in times.items()}
        cell = {"shape": shape, "variant": label, "batch": batch, "candidates": len(candidates),
                "seconds": {"full": round(full_s, 3), "screened": round(screened_s, 3)},
                "same_tile": full == screened, "us": us,
                "spread": {key: [min(v), max(v)] for key, v in times.items()}}
        cells.append(cell)
        print(f"{shape} {label} batch {batch}: {len(candidates)} tiles, tuned in {full_s:.1f} s in full, "
              f"{screened_s:.1f} s screened ({full_s / screened_s:.1f}×); µs fp16 {us['fp16']:.1f}, "
              f"full {us['full']:.1f}, screened {us['screened']:.1f} "
              f"({us['screened'] / us['full']:.3f}×{', the same tile' if full == screened else ''})",
              flush=True)
        if args.json:
            args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "finalists": FINALISTS,
                                             "cells": cells}, indent=1) + "\n")


if __name__ == "__main__":
    main()

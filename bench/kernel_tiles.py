"""Whether a tile option pays: the tuner's candidates split by one TileConfig field, the fastest of each family
found as the tuner finds it (checked against the torch fallback; the seconds that took and the count of
candidates are kept), then the winners and fp16 torch.matmul timed alternately in one run (cold L2, CUDA graphs:
bench/kernel_speed.py's timer). `--family engine --engines triton,cuda,mma` says whether Triton's tiles win
anywhere a CUDA engine applies, and what timing them costs a first use.

    python bench/kernel_tiles.py --engines mma --family rows --shapes 8192x8192 --batches 32 64 \
        --variants mxfp4 nvfp4 --json tiles.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_speed import SHAPES, VARIANTS, Timer, kernel_weight  # noqa: E402

from quantbench.export.kernels import packed_matmul  # noqa: E402
from quantbench.export.kernels.matmul import ENGINES_ENV, TileConfig, _engine_candidates, _fastest  # noqa: E402


def family_winners(x: torch.Tensor, weight, family: str) -> tuple[dict[str, TileConfig], dict[str, dict]]:
    """The fastest tile of each value of `family` among the tuner's candidates, and per value the count of
    candidates and the seconds the tuner took over them (compiles included: a first use's cost)."""
    families: dict[str, list[TileConfig]] = {}
    for config in _engine_candidates(x, weight):
        families.setdefault(str(getattr(config, family)), []).append(config)
    winners, tuning = {}, {}
    for value, configs in sorted(families.items()):
        torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            winners[value] = _fastest(x, weight, configs)
        except RuntimeError as exc:  # no tile of this family runs here
            print(f"  {family}={value}: {exc}", flush=True)
        torch.cuda.synchronize()
        tuning[value] = {"candidates": len(configs), "seconds": round(time.perf_counter() - start, 3)}
    return winners, tuning


def matmul_cells(shapes: list[str], variants: list[str], batches: list[int]):
    """(shape, variant, batch, fp16 weight, kernel weight, x) of each cell of the table, on CUDA."""
    for shape in shapes:
        k, n = map(int, shape.split("x"))
        dense = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
        for label in variants:
            weight = kernel_weight(label, n, k, "cuda")
            for batch in batches:
                yield shape, label, batch, dense, weight, torch.randn(batch, k, device="cuda", dtype=torch.float16)


def alternated(calls: dict[str, object], x: torch.Tensor, timer: Timer, rounds: int) -> dict[str, list[float]]:
    """µs of each call, timed in turn, `rounds` times."""
    times = {label: [] for label in calls}
    for _ in range(rounds):
        for label, call in calls.items():
            times[label].append(timer(call, x))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="rows", help="the TileConfig field that splits the candidates (rows, "
                        "num_stages, capped, split_k, …)")
    parser.add_argument("--engines", default="mma", help=f"as {ENGINES_ENV}")
    parser.add_argument("--shapes", nargs="+", default=[f"{k}x{n}" for k, n in SHAPES], help="KxN (inputs×outputs)")
    parser.add_argument("--batches", nargs="+", type=int, default=[16, 32, 64])
    parser.add_argument("--variants", nargs="+", default=["int4-g128"], choices=list(VARIANTS))
    parser.add_argument("--repeat", type=int, default=10, help="calls per CUDA graph")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the winners and fp16")
    parser.add_argument("--json", type=Path, help="written after every cell")
    args = parser.parse_args()
    if args.family not in {field.name for field in dataclasses.fields(TileConfig)}:
        parser.error(f"--family {args.family}: not a TileConfig field")
    os.environ[ENGINES_ENV] = args.engines
    timer, cells = Timer(args.repeat), []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; family {args.family}, engines {args.engines}")
    for shape, label, batch, dense, weight, x in matmul_cells(args.shapes, args.variants, args.batches):
        winners, tuning = family_winners(x, weight, args.family)
        calls = {"fp16": lambda: torch.matmul(x, dense.t())}
        calls.update({value: (lambda c=config: packed_matmul(x, weight, config=c))
                      for value, config in winners.items()})
        times = alternated(calls, x, timer, args.rounds)
        cell = {"shape": shape, "variant": label, "batch": batch,
                "us": {key: statistics.median(v) for key, v in times.items()},
                "spread": {key: [min(v), max(v)] for key, v in times.items()},
                "tiles": {value: dataclasses.asdict(config) for value, config in winners.items()},
                "tuning": tuning}
        cells.append(cell)
        fp16 = cell["us"]["fp16"]
        parts = [f"{value} {cell['us'][value]:.1f} µs (×{fp16 / cell['us'][value]:.2f} fp16)" for value in winners]
        print(f"{shape} {label} batch {batch}: fp16 {fp16:.1f} µs; " + "; ".join(parts), flush=True)
        print("  tuning: " + "; ".join(f"{value} {t['candidates']} tiles in {t['seconds']:.1f} s"
                                       for value, t in tuning.items()), flush=True)
        if args.json:
            args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "family": args.family,
                                             "engines": args.engines, "cells": cells}, indent=1) + "\n")


if __name__ == "__main__":
    main()

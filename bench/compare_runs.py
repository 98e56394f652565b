"""Cell-by-cell comparison of `bench/kernel_speed.py --json` runs (an A/B of two code versions): each run's
time per (shape, batch, variant) over a baseline, the mean of the runs named by --baseline, as the median,
least and most ratio, and how many cells of each run are slower than fp16 in that run. Two runs of the same
code, one before and one after the others, give the run-to-run spread that a difference must exceed.

    python bench/compare_runs.py old1=a.json same=b.json old2=c.json --baseline old1 old2 [--batches 32 64]
        [--cells 1.07]   (also every cell where some run is 7% faster or slower than the baseline)
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def cells(path: Path) -> dict[tuple[str, int, str], tuple[float, float]]:
    """(shape, batch, variant) → (µs, fp16 µs in the same row) for every packed variant of a run."""
    rows = json.loads(path.read_text())["matmul"]
    return {(row["shape"], row["batch"], variant): (value["us"], row["fp16_us"])
            for row in rows for variant, value in row.items()
            if isinstance(value, dict) and "us" in value and not variant.startswith("tinygemm")}


def shared_cells(runs: dict[str, dict], batches: set[int] | None = None) -> list[tuple[str, int, str]]:
    shared = set.intersection(*(set(r) for r in runs.values()))
    shared = sorted(c for c in shared if batches is None or c[1] in batches)
    if not shared:
        raise ValueError("the runs share no cell")
    return shared


def baseline_us(runs: dict[str, dict], baseline: list[str], cells: list) -> dict:
    return {c: statistics.fmean(runs[name][c][0] for name in baseline) for c in cells}


def compare(runs: dict[str, dict], baseline: list[str], batches: set[int] | None = None) -> dict[str, dict]:
    """Per run: median / min / max of its time over the baseline's mean, and its cells slower than fp16."""
    shared = shared_cells(runs, batches)
    base = baseline_us(runs, baseline, shared)
    summary = {}
    for name, run in runs.items():
        ratios = [run[c][0] / base[c] for c in shared]
        summary[name] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                         "below_fp16": sum(run[c][0] > run[c][1] for c in shared), "cells": len(shared)}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="NAME=JSON")
    parser.add_argument("--baseline", nargs="+", required=True, help="names whose mean time is 1.0")
    parser.add_argument("--batches", nargs="+", type=int)
    parser.add_argument("--cells", type=float, metavar="RATIO",
                        help="also list each cell where a run is this many times faster or slower than the baseline")
    args = parser.parse_args()
    runs = {}
    for spec in args.runs:
        name, _, path = spec.partition("=")
        runs[name] = cells(Path(path))
    unknown = set(args.baseline) - set(runs)
    if unknown:
        parser.error(f"--baseline names no run: {sorted(unknown)}")
    summary = compare(runs, args.baseline, set(args.batches) if args.batches else None)
    for name, s in summary.items():
        print(f"{name:14s} ×{s['median']:.3f} median (×{s['min']:.3f}–×{s['max']:.3f})   "
              f"slower than fp16 in {s['below_fp16']} of {s['cells']} cells")
    if args.cells:
        listed = shared_cells(runs, set(args.batches) if args.batches else None)
        base = baseline_us(runs, args.baseline, listed)
        for cell in listed:
            ratios = [runs[name][cell][0] / base[cell] for name in runs]
            if max(ratios) >= args.cells or min(ratios) <= 1 / args.cells:
                times = "  ".join(f"{name} {runs[name][cell][0]:.1f}" for name in runs)
                print(f"{cell[0]:>11s} b{cell[1]:<3d} {cell[2]:22s} µs: {times}")


if __name__ == "__main__":
    main()

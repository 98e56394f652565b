"""The fastest read of a packed weight's bytes on a cold L2, under the packed matmuls' timer: the most any
batch-1 kernel that must read that weight can reach.

For each size (the bytes of bench/kernel_speed.py's int4-g128 act_order weights at its four shapes, and
1 GiB), torch's own reductions and a streaming-read Triton kernel over a grid of tiles (programs, elements
per load, warps; each program reading one contiguous run or striding over the whole buffer), each timed as
`export/kernels/matmul.graph_time_ms` times a packed matmul (CUDA graphs of flush + call, minus the
flushes). Prints the fastest in µs, TB/s and % of the 1-GB device copy rate, and what 75% of that rate
would take.

    python bench/read_ceiling.py [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))

from kernel_speed import SHAPES, kernel_weight, measured_copy_bandwidth  # noqa: E402

from quantbench.export.kernels.matmul import graph_time_ms  # noqa: E402


@triton.jit
def _read(src, out, n, per_program, BLOCK: tl.constexpr, STRIDED: tl.constexpr):
    """XOR of the int32 words a program reads: [pid·per_program, …) in BLOCK-word loads, or (STRIDED) every
    BLOCK-word tile pid, pid + programs, … of the buffer. One store per program, so nothing is dropped."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    if STRIDED:
        for start in range(pid * BLOCK, n, programs * BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            acc ^= tl.load(src + offsets, mask=offsets < n, other=0, eviction_policy="evict_first")
    else:
        begin = pid * per_program
        for start in range(begin, begin + per_program, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            acc ^= tl.load(src + offsets, mask=offsets < n, other=0, eviction_policy="evict_first")
    tl.store(out + pid, tl.xor_sum(acc, 0))


@triton.jit
def _read_tiles(src, out, rows, n, units, per_program, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                STRIDED: tl.constexpr):
    """The same over a [rows, n] word matrix in the decode kernel's shape: [BLOCK_R, BLOCK_N] tiles taken
    column tile by column tile (all of a tile's rows, then the next tile's), as a contiguous run of
    `per_program` of them per program, or (STRIDED) every tile pid, pid + programs, …"""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    steps = tl.cdiv(rows, BLOCK_R)
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.int32)
    if STRIDED:
        begin, end, stride = pid, units, programs
    else:
        begin, end, stride = pid * per_program, tl.minimum(units, pid * per_program + per_program), 1
    for unit in range(begin, end, stride):
        r = (unit % steps) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = (unit // steps) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc ^= tl.load(src + r[:, None] * n + c[None, :], mask=r[:, None] < rows, other=0,
                       eviction_policy="evict_first")
    tl.store(out + pid, tl.xor_sum(tl.xor_sum(acc, 1), 0))


def triton_read_tiles(words: torch.Tensor, programs: int, block_r: int, block_n: int, warps: int, strided: bool):
    rows, n = words.shape
    units = triton.cdiv(rows, block_r) * (n // block_n)
    per_program = triton.cdiv(units, programs)
    out = torch.empty(programs, dtype=torch.int32, device=words.device)
    return lambda: _read_tiles[(programs,)](words, out, rows, n, units, per_program, BLOCK_R=block_r,
                                            BLOCK_N=block_n, STRIDED=strided, num_warps=warps)


def triton_read(words: torch.Tensor, programs: int, block: int, warps: int, strided: bool):
    n = words.numel()
    per_program = triton.cdiv(triton.cdiv(n, programs), block) * block
    out = torch.empty(programs, dtype=torch.int32, device=words.device)
    return lambda: _read[(programs,)](words, out, n, per_program, BLOCK=block, STRIDED=strided, num_warps=warps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda")
    copy_rate = measured_copy_bandwidth(device)
    processors = torch.cuda.get_device_properties(device).multi_processor_count
    print(f"{time.strftime('%Y-%m-%d')} {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
          f"triton {triton.__version__}; 1-GB device copy {copy_rate / 1e12:.2f} TB/s", flush=True)
    weights = {f"{k}x{n} int4-g128 act_order": kernel_weight("int4-g128 act_order", n, k, device) for k, n in SHAPES}
    sizes = [(label, weight.stored_bytes) for label, weight in weights.items()] + [("1 GiB", 1 << 30)]
    rows = []
    for label, size in sizes:
        words = torch.randint(-2**31, 2**31 - 1, (size // 4,), dtype=torch.int32, device=device)
        candidates = {"torch max": lambda: words.max(), "torch sum": lambda: words.sum()}
        if label in weights:  # the packed words alone ([K / 8, N]), read in the decode kernel's tiles
            qweight = weights[label].qweight
            for programs, (block_r, block_n), warps, strided in itertools.product(
                    (processors, 2 * processors, 4 * processors, 8 * processors),
                    ((8, 128), (16, 64), (16, 128), (8, 256), (32, 64), (32, 128), (16, 256), (64, 64)),
                    (4, 8), (False, True)):
                name = (f"words in {block_r}x{block_n} tiles, {programs} programs, {warps} warps, "
                        f"{'strided' if strided else 'runs'}")
                candidates[name] = triton_read_tiles(qweight, programs, block_r, block_n, warps, strided)
        for programs, block, warps, strided in itertools.product(
                (processors, 2 * processors, 4 * processors, 8 * processors, 16 * processors), (1024, 2048, 4096),
                (4, 8), (False, True)):
            name = f"triton {programs} programs, {block} words, {warps} warps, {'strided' if strided else 'runs'}"
            candidates[name] = triton_read(words, programs, block, warps, strided)
        times = {name: 1e3 * graph_time_ms(call) for name, call in candidates.items()}
        best = min((name for name in times if not name.startswith("words")), key=times.get)
        tiled = [name for name in times if name.startswith("words")]
        best_tiles = min(tiled, key=times.get) if tiled else None
        goal_us = size / (0.75 * copy_rate) * 1e6
        row = {"size": label, "bytes": size, "us": times, "fastest": best, "fastest_us": times[best],
               "copy_rate": copy_rate, "us_at_75_percent_of_copy_rate": goal_us, "fastest_tiles": best_tiles}
        rows.append(row)
        print(f"{label:>32} ({size / 1e6:7.1f} MB): torch max {times['torch max']:7.1f} µs, torch sum "
              f"{times['torch sum']:7.1f} µs, fastest {times[best]:7.1f} µs = {size / times[best] / 1e6:.2f} TB/s "
              f"({size / times[best] / 1e6 / (copy_rate / 1e12):.0%} of the copy rate; {best}); 75% of the copy "
              f"rate would take {goal_us:.1f} µs", flush=True)
        if best_tiles:
            words_bytes = weights[label].qweight.numel() * 4
            print(f"{'':>32} the words alone ({words_bytes / 1e6:.1f} MB) in the kernel's tiles: "
                  f"{times[best_tiles]:.1f} µs = {words_bytes / times[best_tiles] / 1e6:.2f} TB/s "
                  f"({words_bytes / times[best_tiles] / 1e6 / (copy_rate / 1e12):.0%}; {best_tiles})", flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

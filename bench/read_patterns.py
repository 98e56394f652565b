"""Which traits of a batch-1 kernel's read pattern set its read rate: the packed words alone ([K / 8, N] int32,
the decode kernel's layout) read by `bench/read_patterns.cu` in every combination of load width (4, 8, 16
bytes), rows per thread and round (2–16), threads per block, the next round loaded while this one is used or
not, bytes per block along a row (128, 256, 512), blocks along the rows (splits) and consecutive or interleaved
rows per thread. Timed as `export/kernels/matmul.graph_time_ms` times a packed matmul (CUDA graphs, cold L2).

In the same run, for reference: the decode kernel's loads alone in its usual batch-1 tile (32 lanes, 512 threads,
registers) and the fastest Triton tile read of `bench/read_ceiling.py` (32 × 128 words, 528 programs, 8 warps).
Prints the fastest patterns per shape and the fastest for each value of each trait.

    python bench/read_patterns.py [--shapes 4096x14336 …] [--json out.json]

The library is built with nvcc on first use (about a minute) and cached beside the kernels' libraries.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))

from kernel_speed import SHAPES, kernel_weight, measured_copy_bandwidth  # noqa: E402

from quantbench.export.kernels import cuda_build, cuda_gemv  # noqa: E402
from quantbench.export.kernels.matmul import graph_time_ms  # noqa: E402

SOURCE = Path(__file__).with_suffix(".cu")
TRAITS = {"width": (4, 8, 16), "rows": (2, 4, 8, 16), "threads": (128, 256, 512), "pipelined": (False, True),
          "segment": (128, 256, 512), "splits": (1, 2, 4, 8), "interleaved": (False, True)}


def library(arch: str) -> ctypes.CDLL:
    flags = ["-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", f"-gencode=arch=compute_{arch},code=sm_{arch}"]
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:12]
    path = cuda_build.cache_dir() / f"read_patterns-sm{arch}-{digest}.so"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
            built = Path(scratch) / path.name
            subprocess.run([cuda_build.nvcc_path(), *flags, str(SOURCE), "-o", str(built)], check=True)
            built.replace(path)
    lib = ctypes.CDLL(str(path))
    lib.quantbench_read_words.argtypes = [ctypes.c_int] * 7 + [ctypes.c_void_p] * 2 + [ctypes.c_int] * 2 + \
        [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
    return lib


def pattern_call(lib, words: torch.Tensor, out: torch.Tensor, p: dict):
    lanes = p["segment"] // p["width"]
    arguments = [p["width"], p["rows"], p["threads"], int(p["pipelined"]), lanes, p["splits"], int(p["interleaved"]),
                 words.data_ptr(), out.data_ptr(), words.shape[0], words.shape[1]]

    def call():
        error = lib.quantbench_read_words(*arguments, torch.cuda.current_stream().cuda_stream, None)
        if error:
            raise RuntimeError(f"read_words {p}: cudaError {error}")

    blocks_per_sm = ctypes.c_int(0)
    lib.quantbench_read_words(*arguments, None, ctypes.byref(blocks_per_sm))
    return call, blocks_per_sm.value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=[f"{k}x{n}" for k, n in SHAPES], help="KxN (inputs×outputs)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda")
    from read_ceiling import triton_read_tiles

    lib = library(cuda_build.device_arch(device))
    copy_rate = measured_copy_bandwidth(device)
    processors = torch.cuda.get_device_properties(device).multi_processor_count
    print(f"{time.strftime('%Y-%m-%d')} {torch.cuda.get_device_name(device)}, torch {torch.__version__}; "
          f"1-GB device copy {copy_rate / 1e12:.2f} TB/s; {processors} multiprocessors", flush=True)
    rows = []
    for shape in args.shapes:
        k, n = map(int, shape.split("x"))
        weight = kernel_weight("int4-g128 act_order", n, k, device)
        words = weight.qweight
        size = words.numel() * 4
        x = torch.randn(1, k, device=device, dtype=torch.float16)
        out = torch.zeros(65536, dtype=torch.int32, device=device)
        kernel_us = 1e3 * graph_time_ms(lambda: cuda_gemv.launch(x, weight, 1, 32, 512, load_only=True))
        triton_us = 1e3 * graph_time_ms(triton_read_tiles(words, 4 * processors, 32, 128, 8, False))
        print(f"{shape:>11}: {size / 1e6:.1f} MB of words; the decode kernel's loads alone (32 lanes, 512 threads) "
              f"{kernel_us:.1f} µs, Triton 32x128 tiles ({4 * processors} programs) {triton_us:.1f} µs", flush=True)
        measured = []
        for values in itertools.product(*TRAITS.values()):
            p = dict(zip(TRAITS, values))
            if p["segment"] // p["width"] > p["threads"] or (p["width"] == 16 and p["rows"] == 16 and p["pipelined"]
                                                               and p["threads"] == 512):  # spills
                continue
            call, blocks_per_sm = pattern_call(lib, words, out, p)
            us = 1e3 * graph_time_ms(call)
            blocks = -(-n // (p["segment"] // 4)) * p["splits"]
            row = {"shape": shape, **p, "us": us, "blocks": blocks, "blocks_per_sm": blocks_per_sm,
                   "percent_of_copy_rate": 100 * size / us / 1e6 / (copy_rate / 1e12),
                   "kernel_loads_us": kernel_us, "triton_tiles_us": triton_us}
            measured.append(row)
        rows += measured

        def describe(r):
            return (f"{r['us']:5.1f} µs {r['percent_of_copy_rate']:3.0f}%  width {r['width']:2} rows {r['rows']:2} "
                    f"threads {r['threads']:3} {'pipelined' if r['pipelined'] else 'round by round':14} segment "
                    f"{r['segment']:3} B splits {r['splits']} {'interleaved' if r['interleaved'] else 'consecutive'}"
                    f" — {r['blocks']} blocks, {r['blocks_per_sm']} fit a multiprocessor")
        print(f"{shape:>11}: the fastest of {len(measured)} patterns", flush=True)
        for r in sorted(measured, key=lambda r: r["us"])[:10]:
            print(f"{'':13}{describe(r)}")
        for trait, values in TRAITS.items():
            best = {v: min((r for r in measured if r[trait] == v), key=lambda r: r["us"]) for v in values}
            print(f"{shape:>11}: fastest by {trait}: "
                  + ", ".join(f"{v}: {best[v]['us']:.1f}" for v in values), flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

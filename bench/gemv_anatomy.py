"""Where the CUDA decode kernel's time goes at batch 1: each tile configuration (weights through registers a
slab or a row at a time, or cp.async stages; splits of K; blocks along the outputs; x held in shared memory
or not) timed whole and with its weight loads alone (nothing decoded), against torch reading the same words
(`max`) and copying them, on a cold L2 with x cached (CUDA graphs; bench/kernel_speed.py's timer).

    python bench/gemv_anatomy.py [--shapes 8192x8192 …] [--loads registers streamed] [--mma-shaped] [--json F]

The load-only time is what this access pattern costs; whole − load-only is what decoding adds where it does
not hide under the loads. `--mma-shaped` also times each tile with the loads and the instructions a
tensor-core decode would run instead (one LOP3 per code pair, one m16n8k16 product per 4 pairs; a wrong
result): what the decode would add if it cost that much. The copy gives the device's copy rate at this size,
under the same timer.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernel_speed import SHAPES, kernel_weight  # noqa: E402

from quantbench.export.kernels import cuda_gemv  # noqa: E402
from quantbench.export.kernels.matmul import graph_time_ms  # noqa: E402


LOADS = {"registers": {}, "streamed": {"streamed": True}, "cp.async": {"async_copies": True}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=[f"{k}x{n}" for k, n in SHAPES], help="KxN (inputs×outputs)")
    parser.add_argument("--variants", nargs="+", default=["int4-g128 act_order", "ternary2"])
    parser.add_argument("--loads", nargs="+", default=list(LOADS), choices=list(LOADS))
    parser.add_argument("--mma-shaped", action="store_true", help="also time a tensor-core-shaped decode")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda")
    print(f"{time.strftime('%Y-%m-%d')} {torch.cuda.get_device_name(device)}", flush=True)
    rows = []
    for shape in args.shapes:
        k, n = map(int, shape.split("x"))
        x = torch.randn(1, k, device=device, dtype=torch.float16)
        for label in args.variants:
            weight = kernel_weight(label, n, k, device)
            read_us = 1e3 * graph_time_ms(lambda: weight.qweight.max())
            copy = torch.empty_like(weight.qweight)
            copy_us = 1e3 * graph_time_ms(lambda: copy.copy_(weight.qweight))
            copy_rate = 2 * weight.qweight.numel() * 4 / copy_us / 1e6  # TB/s
            print(f"{shape:>11} {label:>20}: torch reads the words in {read_us:6.1f} µs, copies them in "
                  f"{copy_us:6.1f} µs ({copy_rate:.2f} TB/s)", flush=True)
            processors = cuda_gemv.multiprocessors(device)
            for load in args.loads:
                for lanes in cuda_gemv.LANES:
                    for threads in cuda_gemv.THREADS:
                        for splits in cuda_gemv.split_choices(1, weight, 1, lanes, threads, processors):
                            for blocks, held in itertools.product(
                                    cuda_gemv.column_block_choices(n, lanes, splits, processors),
                                    cuda_gemv.x_choices(weight)):
                                def call(load_only=0):
                                    return cuda_gemv.launch(x, weight, 1, lanes, threads, load_only=load_only,
                                                            splits=splits, x_in_shared=held, column_blocks=blocks,
                                                            **LOADS[load])
                                try:
                                    call()
                                except (RuntimeError, ValueError) as exc:  # a tile this device does not take
                                    print(f"{shape:>11} {label:>20} {load:9} lanes {lanes:2} threads {threads:3} "
                                          f"splits {splits:2} column blocks {blocks}: not run ({exc})", flush=True)
                                    continue
                                whole = 1e3 * graph_time_ms(call, warm=(x,))
                                loads = 1e3 * graph_time_ms(lambda: call(load_only=1), warm=(x,))
                                shaped = (1e3 * graph_time_ms(lambda: call(load_only=2), warm=(x,))
                                          if args.mma_shaped else None)
                                row = {"shape": shape, "variant": label, "loads": load, "lanes": lanes,
                                       "threads": threads, "splits": splits, "column_blocks": blocks,
                                       "x_in_shared": held, "us": whole, "load_only_us": loads,
                                       "mma_shaped_us": shaped,
                                       "torch_read_us": read_us, "torch_copy_us": copy_us,
                                       "bytes": weight.stored_bytes}
                                rows.append(row)
                                print(f"{shape:>11} {label:>20} {load:9} lanes {lanes:2} threads {threads:3} "
                                      f"splits {splits:2} column blocks {blocks or 'one per tile':>12} "
                                      f"x {'shared' if held else 'memory'}: {whole:6.1f} µs, loads alone "
                                      f"{loads:6.1f} µs" + (f", tensor-core-shaped {shaped:6.1f} µs" if shaped else ""),
                                      flush=True)
                if args.json:
                    args.json.write_text(json.dumps(rows, indent=1))
            best = min((r for r in rows if r["shape"] == shape and r["variant"] == label), key=lambda r: r["us"])
            print(f"{shape:>11} {label:>20}: fastest {best['us']:.1f} µs (loads alone {best['load_only_us']:.1f}) "
                  f"= {best['bytes'] / best['us'] / 1e6:.2f} TB/s with lanes {best['lanes']}, threads "
                  f"{best['threads']}, splits {best['splits']}, column blocks {best['column_blocks']}, "
                  f"{best['loads']}, x from {'shared memory' if best['x_in_shared'] else 'memory'}",
                  flush=True)
            if args.mma_shaped:
                shaped = min((r for r in rows if r["shape"] == shape and r["variant"] == label),
                             key=lambda r: r["mma_shaped_us"])
                print(f"{shape:>11} {label:>20}: fastest tensor-core-shaped {shaped['mma_shaped_us']:.1f} µs "
                      f"(whole {shaped['us']:.1f}, loads alone {shaped['load_only_us']:.1f}) with lanes "
                      f"{shaped['lanes']}, threads {shaped['threads']}, splits {shaped['splits']}, column blocks "
                      f"{shaped['column_blocks']}, {shaped['loads']}", flush=True)


if __name__ == "__main__":
    main()

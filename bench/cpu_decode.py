"""Greedy decode on the CPU from a quantbench checkpoint: tokens/s dequantized (dense) and packed
(`load_quantized(kernels=True)`), in float32 and bfloat16, in one run; then one int4 matmul at batch 1
(`--shape`) through torch's CPU int4 kernel in bfloat16 and float32, against dense matmuls of both.

Each setting is loaded once, warmed up with a short generation, then timed over `--tokens` new tokens,
`--repeat` times (median). Settings alternate within each repeat, so the machine's drift falls on all alike.

    python bench/cpu_decode.py runs/quickstart/checkpoint --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantbench import load_quantized  # noqa: E402

SETTINGS = [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False), (torch.bfloat16, True)]


@torch.no_grad()
def tokens_per_s(model, prompt: torch.Tensor, tokens: int) -> float:
    started = time.perf_counter()
    model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return tokens / (time.perf_counter() - started)


def matmul_times(k: int, n: int, group: int = 128, calls: int = 50) -> dict[str, float]:
    """µs per call at batch 1: dense x·Wᵀ and torch's CPU int4 kernel, each in float32 and bfloat16."""
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    scales = torch.rand(k // group, n) * 0.01
    dense = torch.randn(n, k)
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, w = torch.randn(1, k, dtype=dtype), dense.to(dtype)
        scales_and_m = torch.stack([scales, scales], -1).to(dtype).contiguous()
        runs = {"dense": lambda: x @ w.T,
                "int4": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_m)}
        for name, call in runs.items():
            for _ in range(3):
                call()
            started = time.perf_counter()
            for _ in range(calls):
                call()
            times[f"{name} {str(dtype).removeprefix('torch.')}"] = (time.perf_counter() - started) / calls * 1e6
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--shape", default="4096x4096", help="KxN of the matmul timed alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompt = torch.arange(1, 9)[None]
    models = {}
    for dtype, kernels in SETTINGS:
        model = models[dtype, kernels] = load_quantized(args.checkpoint, dtype=dtype, kernels=kernels)
        tokens_per_s(model, prompt, 4)  # the packed layers' one-time conversions happen here
    rates = {setting: [] for setting in SETTINGS}
    for _ in range(args.repeat):
        for setting, model in models.items():
            rates[setting].append(tokens_per_s(model, prompt, args.tokens))
    print(f"{time.strftime('%Y-%m-%d')} {args.checkpoint}, {args.threads} threads, {args.tokens} new tokens, "
          f"median of {args.repeat}; torch {torch.__version__}")
    dense32 = statistics.median(rates[torch.float32, False])
    for (dtype, kernels), values in rates.items():
        rate = statistics.median(values)
        print(f"  {str(dtype).removeprefix('torch.'):>9} {'packed' if kernels else 'dense ':>6}: {rate:6.1f} tok/s "
              f"({rate / dense32:.2f}× dense float32; {', '.join(f'{v:.1f}' for v in values)})")
    k, n = map(int, args.shape.split("x"))
    times = matmul_times(k, n)
    print(f"  one {k}×{n} matmul at batch 1: " + ", ".join(f"{name} {us:,.0f} µs" for name, us in times.items()))


if __name__ == "__main__":
    main()

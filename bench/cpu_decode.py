"""Greedy decode on the CPU from a quantbench checkpoint: tokens/s dequantized (dense) and packed
(`load_quantized(kernels=True)`), in float32 and bfloat16, in one run.

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
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


if __name__ == "__main__":
    main()

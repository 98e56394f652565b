"""A decode step's attention alone: one query token of Llama-3-8B's heads (32 query, 8 key/value, 128 wide) against a
static cache, three ways, each on a cold L2 (CUDA graphs; bench/kernel_speed.py's timer):

- `repeat` — transformers' `sdpa` under torch.compile: each key/value head copied for its query heads, then
  scaled_dot_product_attention;
- `grouped` — the query heads grouped by their key/value head, one scaled_dot_product_attention on the cache as it
  lies (`QUANTBENCH_DECODE_ATTENTION=sdpa`);
- `split` — the split-cache Triton kernel (export/kernels/split_attention.py, the default on the GPU).

    python bench/decode_attention_speed.py [--batches 1 8] [--lengths 73 265 1024 4096 16384] [--json F]

Each cache is timed full (every position attended) and half filled (the mask hides the second half, as a static
cache sized for a longer run does). Printed: µs, the attended keys and values' bytes over the time (TB/s), and the
largest difference from float32 attention.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantbench.export.kernels.matmul import graph_time_ms  # noqa: E402
from quantbench.export.kernels.split_attention import split_decode_attention  # noqa: E402

HEADS, KV_HEADS, DIM = 32, 8, 128
GROUPS = HEADS // KV_HEADS


def ways(query, key, value, mask, scale):
    batch = query.shape[0]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return {
        "repeat": lambda: sdpa(query, key.repeat_interleave(GROUPS, 1), value.repeat_interleave(GROUPS, 1),
                               attn_mask=mask, scale=scale),
        "grouped": lambda: sdpa(query.view(batch, KV_HEADS, GROUPS, DIM), key, value, attn_mask=mask, scale=scale),
        "split": lambda: split_decode_attention(query, key, value, mask, scale),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--lengths", nargs="+", type=int, default=[73, 265, 1024, 4096, 16384])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda")
    print(f"{time.strftime('%Y-%m-%d')} {torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    rows = []
    for batch in args.batches:
        for length in args.lengths:
            g = torch.Generator(device).manual_seed(length)
            query = torch.randn(batch, HEADS, 1, DIM, device=device, dtype=torch.float16, generator=g)
            key, value = (torch.randn(batch, KV_HEADS, length, DIM, device=device, dtype=torch.float16, generator=g)
                          for _ in range(2))
            for filled in (length, (length + 1) // 2):
                mask = (torch.arange(length, device=device) < filled).view(1, 1, 1, length)
                scale = DIM ** -0.5
                expected = torch.nn.functional.scaled_dot_product_attention(
                    query.float(), *(t.float().repeat_interleave(GROUPS, 1) for t in (key, value)), attn_mask=mask,
                    scale=scale).reshape(batch, HEADS, DIM)
                attended = 2 * batch * KV_HEADS * filled * DIM * 2
                timings = {}
                for name, fn in ways(query, key, value, mask, scale).items():
                    error = (fn().float().reshape(batch, HEADS, DIM) - expected).abs().max().item()
                    us = 1e3 * graph_time_ms(fn, calls=20, rounds=5, warm=(query,))
                    timings[name] = us
                    rows.append({"batch": batch, "length": length, "filled": filled, "way": name, "us": us,
                                 "tb_s": attended / us / 1e6, "max_error": error})
                print(f"batch {batch:2d}, cache {length:6d}, {filled:6d} attended: "
                      + ", ".join(f"{name} {us:7.1f} µs ({attended / us / 1e6:4.2f} TB/s)"
                                  for name, us in timings.items())
                      + f"; split {timings['grouped'] / timings['split']:.2f}× grouped, "
                      f"max error {max(r['max_error'] for r in rows[-3:]):.1e}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

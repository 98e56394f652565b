"""Where a decode step's time goes: every GPU kernel of one step of a random-weight Llama, from the
profiler's trace of CUDA-graph replays, grouped by kind (packed matmuls, cuBLAS, attention, fused Triton,
other small kernels).

    python bench/decode_profile.py --size 8b --variants "int4-g128 act_order" [--compile] [--head] [--pdl] [--json F]

Per model: the step's time (graph replays, CUDA events), the kernels per step and their summed time (the
rest of the step is the gaps between kernels), each kind's count and time, and the costliest kernels.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_speed import FLOOR, GATED, VARIANTS, captured, enable_inductor_pdl, prepared_decode  # noqa: E402
from random_models import SIZES  # noqa: E402

from quantbench.export.kernels import decode_attention  # noqa: E402

KINDS = [  # first match wins; inductor names its kernels triton_* after the operations they fuse
    ("fused Triton", r"^triton_"),
    ("packed matmul", r"packed_gemv|packed_mma|gather_inputs|matmul_kernel"),
    ("cuBLAS matmul", r"gemm|gemv|nvjet|cutlass|xmma|splitK"),
    ("attention", r"flash|fmha|attention|softmax|sdpa"),
    ("copy, fill", r"copy|Memcpy|Memset|fill|index_put|scatter"),
]


def kind_of(kernel: str) -> str:
    return next((kind for kind, pattern in KINDS if re.search(pattern, kernel)), "other small kernels")


def step_us(replay, calls: int = 50) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    replay()
    start.record()
    for _ in range(calls):
        replay()
    end.record()
    torch.cuda.synchronize()
    return 1e3 * start.elapsed_time(end) / calls


def kernels_per_step(replay, steps: int = 10) -> dict[str, tuple[float, float]]:
    """{kernel name: (calls per step, µs per step)} from the profiler's trace of `steps` replays."""
    replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            replay()
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name][0] += 1
            totals[event.name][1] += event.time_range.elapsed_us()
    return {name: (count / steps, us / steps) for name, (count, us) in totals.items()}


def profiled(label: str, args) -> dict:
    variant = None if label == "fp16" else label
    step, _ = prepared_decode(variant, torch.device("cuda"), 64, args.prompt, args.size, args.batch, True,
                              args.compile, args.attention, head=args.head)
    graph = captured(step)
    kernels = kernels_per_step(graph.replay)
    source = "graph replays"
    if not kernels:  # a profiler that does not see into graphs: the same kernels, launched one by one
        kernels, source = kernels_per_step(step), "eager steps"
    layers = SIZES.get(args.size, {}).get("num_hidden_layers")
    kinds: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for name, (count, us) in kernels.items():
        kinds[kind_of(name)][0] += count
        kinds[kind_of(name)][1] += us
    result = {"model": label, "size": args.size, "batch": args.batch, "compiled": args.compile,
              "attention": args.attention or "sdpa", "lm_head_packed": args.head and variant not in (None, FLOOR),
              "inductor_pdl": args.pdl, "source": source,
              "step_us": step_us(graph.replay), "kernels": sum(c for c, _ in kernels.values()),
              "kernel_us": sum(us for _, us in kernels.values()),
              "kinds": {kind: {"count": c, "us": us} for kind, (c, us) in kinds.items()},
              "top": sorted(([name[:120], c, us] for name, (c, us) in kernels.items()), key=lambda r: -r[2])[:15]}
    print(f"\n{label} ({args.size}, batch {args.batch}{', compiled' if args.compile else ''}, "
          f"{args.attention or 'sdpa'} attention; {source}): "
          f"step {result['step_us']:.0f} µs ({args.batch * 1e6 / result['step_us']:.1f} tok/s), "
          f"{result['kernels']:.0f} kernels summing to {result['kernel_us']:.0f} µs"
          + (f"; per layer {result['kernels'] / layers:.1f} kernels" if layers else ""), flush=True)
    for kind, (count, us) in sorted(kinds.items(), key=lambda kv: -kv[1][1]):
        print(f"  {kind:<22} {count:6.0f} kernels {us:8.1f} µs")
    for name, count, us in result["top"]:
        print(f"    {us:8.1f} µs {count:5.0f}×  {name}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="8b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="the model's forward torch.compile'd")
    parser.add_argument("--attention", default=decode_attention.ATTENTION,
                        help="transformers' attention implementation (default: quantbench's decode attention, as "
                        "load_quantized(kernels=True) gives it; sdpa, eager, …)")
    parser.add_argument("--head", action="store_true", help="lm_head packed too")
    parser.add_argument("--pdl", action="store_true",
                        help="with --compile: inductor's Triton kernels launch dependent (TORCHINDUCTOR_ENABLE_PDL)")
    parser.add_argument("--variants", nargs="+", default=["int4-g128 act_order"], choices=list(VARIANTS))
    parser.add_argument("--gated", action="store_true",
                        help="also profile each variant with gated MLPs (fused.GatedMLP: silu(gate)·up stored by the "
                             "matmul's kernel)")
    parser.add_argument("--no-floor", action="store_true", help="skip the model without weight matmuls")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/decode_profile.py profiles GPU kernels; run it on a GPU")
    if args.pdl:
        enable_inductor_pdl()
    results = []
    gated = [v + GATED for v in args.variants] if args.gated else []
    for label in ["fp16", *args.variants, *gated, *([] if args.no_floor else [FLOOR])]:
        results.append(profiled(label, args))
        torch.cuda.empty_cache()
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

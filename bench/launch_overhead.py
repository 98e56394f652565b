"""Host time of one eager call of a packed layer (no CUDA graph, no compile), against nn.Linear in float16: what
a decode step without graphs pays per layer before the GPU sees a kernel.

    python bench/launch_overhead.py [--device cuda] [--shape 4096x4096] [--variants "int4-g128 act_order" …] [--operator]

Each layer is called `--calls` times back to back on x [1, 1, K] (one decode token), the queue drained every 100
calls. Per call: the wall time (the host's, where it exceeds the GPU's), the GPU's time from CUDA events over the
same calls, and the host time with the kernel launch itself taken out (`--profile`: the functions that take the
host's time, from cProfile over 500 calls). `--operator` calls the packed layers as a compiled model without
CUDA graphs does where no gradient is needed, through the `quantbench::packed_linear_inference` operator. On the
CPU the wall time includes the computation.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernel_speed import VARIANTS, kernel_weight  # noqa: E402

from quantbench.export.kernels import PackedLinear  # noqa: E402
from quantbench.export.kernels.modules import packed_linear_inference  # noqa: E402

DRAIN_EVERY = 100


class AsCompiled(nn.Module):
    """A packed layer called as a compiled model's graph calls it, without CUDA graphs and without gradients: the
    `quantbench::packed_linear_inference` operator on its buffers."""

    def __init__(self, layer: PackedLinear):
        super().__init__()
        self.arguments = (layer.qweight, layer.scales, layer.zeros, layer.perm, layer.kind, layer.bits,
                          layer.out_features, layer.in_features, layer.group, layer.global_scale, layer.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear_inference(x, *self.arguments)


def per_call_us(layer: nn.Module, x: torch.Tensor, calls: int, repeat: int) -> tuple[float, float | None]:
    """(median wall µs a call, GPU µs a call or None on the CPU) over `repeat` runs of `calls` calls."""
    cuda = x.is_cuda
    walls, gpus = [], []
    for _ in range(repeat):
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        began = time.perf_counter()
        for i in range(calls):
            layer(x)
            if cuda and i % DRAIN_EVERY == DRAIN_EVERY - 1:
                torch.cuda.synchronize()
        if cuda:
            end.record()
            torch.cuda.synchronize()
            gpus.append(start.elapsed_time(end) * 1e3 / calls)
        walls.append((time.perf_counter() - began) * 1e6 / calls)
    return statistics.median(walls), statistics.median(gpus) if cuda else None


def profile_lines(layer: nn.Module, x: torch.Tensor, calls: int = 500, top: int = 12) -> list[str]:
    """The functions with the most own time over `calls` calls, µs a call."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        layer(x)
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    rows = sorted(((own, count, f"{Path(file).name}:{line} {name}") for (file, line, name), (_, count, own, _, _)
                   in stats.items()), reverse=True)[:top]
    return [f"    {own * 1e6 / calls:6.1f} µs {count / calls:4.1f}×  {where}" for own, count, where in rows]


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", default="4096x4096", help="KxN (inputs×outputs)")
    parser.add_argument("--variants", nargs="+", default=["int4-g128 act_order", "int4-g128", "ternary2", "nvfp4"],
                        choices=list(VARIANTS))
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="also the functions that take the host's time")
    parser.add_argument("--operator", action="store_true",
                        help="call the packed layers through their torch operator, as a compiled model does")
    args = parser.parse_args()
    device = torch.device(args.device)
    k, n = map(int, args.shape.split("x"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    x = torch.randn(1, 1, k, device=device, dtype=dtype)
    layers = {"fp16 nn.Linear" if device.type == "cuda" else "float32 nn.Linear":
              nn.Linear(k, n, bias=False, device=device, dtype=dtype)}
    for label in args.variants:
        layer = PackedLinear(kernel_weight(label, n, k, device), dtype=dtype).to(device)
        layers[f"{label} (operator)" if args.operator else label] = AsCompiled(layer) if args.operator else layer
    print(f"{time.strftime('%Y-%m-%d')} {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
          f"torch {torch.__version__}; x [1, 1, {k}] → {n} outputs, {args.calls} calls × {args.repeat}")
    for label, layer in layers.items():
        for _ in range(3):  # tunes a packed layer's tile and warms up
            layer(x)
        wall, gpu = per_call_us(layer, x, args.calls, args.repeat)
        gpu_text = "" if gpu is None else f", GPU {gpu:6.1f} µs a call"
        print(f"{label:>33}: wall {wall:6.1f} µs a call{gpu_text}", flush=True)
        if args.profile:
            print("\n".join(profile_lines(layer, x)), flush=True)


if __name__ == "__main__":
    main()

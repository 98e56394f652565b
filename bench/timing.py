"""One way to time a call in the benchmarks: CUDA events on the GPU, perf_counter on the CPU."""

from __future__ import annotations

import statistics
import time

import torch


def timed(fn, device: torch.device, repeat: int = 1, warmup: bool = False):
    """(median seconds of `repeat` calls, the last call's result); `warmup` makes one untimed call first."""
    if warmup:
        fn()
    times, out = [], None
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), out

"""Peak memory of a span of work: host resident set (Linux's VmHWM, reset between spans through
/proc/self/clear_refs) and CUDA memory allocated by torch (reset_peak_memory_stats). Where the reset is
not possible, the host figure is the process's peak so far."""

from __future__ import annotations

import resource
from pathlib import Path

import torch

CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")


def reset_peaks(device: torch.device) -> None:
    try:
        CLEAR_REFS.write_text("5")  # 5: reset the peak resident set size
    except OSError:
        pass
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def read_peaks(device: torch.device) -> dict[str, float]:
    """{"host_rss_mb", "device_mb" (CUDA only)}: the peaks since the last reset."""
    peaks = {"host_rss_mb": round(_host_peak_kb() / 1024, 1)}
    if device.type == "cuda":
        peaks["device_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peaks


def _host_peak_kb() -> int:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def overall(by_stage: dict[str, dict[str, float]]) -> dict[str, float]:
    """The run's peaks: the largest of every stage's."""
    keys = {key for peaks in by_stage.values() for key in peaks}
    return {key: max(peaks.get(key, 0.0) for peaks in by_stage.values()) for key in sorted(keys)}

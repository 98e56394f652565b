"""Memory free now on a device, and the peak memory of a span of work: host resident set (Linux's VmHWM,
reset between spans through /proc/self/clear_refs) and CUDA memory allocated by torch
(reset_peak_memory_stats). Where the reset is not possible, the host figure is the process's peak so far."""

from __future__ import annotations

import os
import re
import resource
from pathlib import Path

import torch

CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")
MEMINFO = Path("/proc/meminfo")


def available_host_bytes() -> int | None:
    """Host memory available to new allocations (Linux's MemAvailable), or None where it cannot be read."""
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(re.findall(r"\d+", line)[0]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def free_bytes(device: torch.device) -> int | None:
    """What torch could still allocate on `device` now (on a GPU: free memory plus its own unused cache)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return available_host_bytes() if device.type == "cpu" else None


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

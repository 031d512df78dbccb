"""Peak memory of a block of code: CUDA allocator statistics, or the process's VmHWM on CPU."""

from __future__ import annotations

import gc
import logging
import os
from typing import Any

import torch

logger = logging.getLogger(__name__)

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _status_kib(field: str) -> int | None:
    try:
        with open(_STATUS) as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_rss_bytes() -> int:
    """The process's current resident set in bytes (0 where unknown)."""
    kib = _status_kib("VmRSS")
    return (kib or 0) * 1024


def cpu_peak_rss_bytes() -> int:
    """The process's peak resident set (VmHWM) in bytes (0 where unknown)."""
    kib = _status_kib("VmHWM")
    return (kib or 0) * 1024


def reset_cpu_peak() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel refuses."""
    try:
        with open(_CLEAR_REFS, "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager: ``peak_bytes`` = peak memory above the level at entry.

    Args:
        device: where the computation runs (``cuda`` uses allocator stats, else the
            process RSS).

    Example:
        >>> with PeakMemory("cpu") as meter:
        ...     x = torch.ones(1_000_000)
        >>> meter.peak_bytes >= 0
        True
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.peak_bytes = 0
        self.method = ""
        self._start = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            self.method = "cuda_max_allocated"
        else:
            self._reset_ok = reset_cpu_peak()
            self._start = cpu_rss_bytes()
            self.method = "vmhwm" if self._reset_ok else "vmhwm_unreset"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = cpu_peak_rss_bytes()
        self.peak_bytes = max(0, peak - self._start)


def release_memory(device: torch.device | str | None = None, full: bool = False) -> None:
    """Free what a metric left, and on CUDA return cached blocks (``empty_cache()``).

    A full ``gc.collect()`` costs about 0.3 s in a process that has imported
    transformers and a tracker, so it runs only when asked (``full``: aggressive cleanup,
    or after a failure, whose traceback cycle holds the failed frames' tensors) or on
    CUDA; otherwise the young generations are collected (microseconds). CPU tensors
    outside reference cycles are freed as soon as the metric returns.
    """
    on_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    gc.collect() if (full or on_cuda) else gc.collect(1)
    if on_cuda:
        torch.cuda.empty_cache()

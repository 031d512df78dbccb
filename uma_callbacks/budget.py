"""Memory: measure the peak of a block, and the budget metrics plan their chunks against.

Peaks are measured, not guessed:

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; the peak
  reported is the maximum minus what was allocated at the start.
- CPU: the process's peak resident set (``VmHWM`` in ``/proc/self/status``), reset by
  writing ``5`` to ``/proc/self/clear_refs``; where that is not allowed, the peak of
  ``VmRSS`` polled around the block (a lower bound). The peak reported is the high-water
  mark minus the resident set at the start.
"""

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


def release_memory(device: torch.device | str | None = None) -> None:
    """Free what a metric left: ``gc.collect()`` and, on CUDA, ``empty_cache()``."""
    gc.collect()
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.empty_cache()


def param_bytes(model: torch.nn.Module, trainable_only: bool = True) -> int:
    """Bytes of the (trainable) parameters."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad or not trainable_only)


def available_bytes(device: torch.device | str = "cpu") -> int:
    """Free memory on ``device``: CUDA ``mem_get_info``; CPU ``MemAvailable``."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


class MemoryBudget:
    """How much memory the diagnostics may take on top of what training holds.

    Args:
        max_bytes: the budget in bytes.
        max_gb: the budget in GiB (alternative to ``max_bytes``).
        device: the device it applies to (default: the model's).
        margin: fraction of free memory kept back when no explicit budget is given.

    Raises:
        ValueError: both or a non-positive size, or a margin outside [0, 1).
    """

    def __init__(
        self,
        max_bytes: int | None = None,
        max_gb: float | None = None,
        device: torch.device | str | None = None,
        margin: float = 0.2,
    ) -> None:
        if max_bytes is not None and max_gb is not None:
            raise ValueError("MemoryBudget takes max_bytes or max_gb, not both")
        for field_name, value in (("max_bytes", max_bytes), ("max_gb", max_gb)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
                raise ValueError(f"MemoryBudget.{field_name} must be a positive number or None; got {value!r}")
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 1:
            raise ValueError(f"MemoryBudget.margin must be in [0, 1); got {margin!r}")
        self.max_bytes = int(max_bytes) if max_bytes is not None else (int(max_gb * 2**30) if max_gb else None)
        self.device = torch.device(device) if device is not None else None
        self.margin = float(margin)

    def limit_bytes(self, device: torch.device | str | None = None) -> int:
        """The budget in bytes: the explicit one, else free memory minus the margin."""
        if self.max_bytes is not None:
            return self.max_bytes
        return int(available_bytes(device or self.device or "cpu") * (1 - self.margin))

    def __repr__(self) -> str:
        return f"MemoryBudget(max_bytes={self.max_bytes}, device={self.device}, margin={self.margin})"

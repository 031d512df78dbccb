"""Peak memory of a block of code, without touching the process's own peak counters.

Users watch ``ru_maxrss`` / ``VmHWM`` and ``torch.cuda.max_memory_allocated`` for their
own runs, so this module never resets them (no ``/proc/self/clear_refs``, no
``torch.cuda.reset_peak_memory_stats``). :class:`PeakMemory` instead samples the current
level from a small thread while the block runs (every :data:`SAMPLE_SECONDS`, and at entry
and exit):

- CPU with glibc: the bytes the allocator has handed out and not taken back
  (``mallinfo2``: arenas plus mmapped chunks), which is what the block's tensors and
  buffers hold (``method`` ``"malloc_sampled"``). The same work reads the same at every
  step. The resident set does not: glibc keeps freed pages (and raises its mmap threshold
  after the first large free), so a block that needed 15 MB of new pages at its first run
  reused them at the next and read 0.004 MB;
- CPU elsewhere: ``VmHWM`` when the block raised the process's high-water mark
  (``"vmhwm_delta"``), else the highest ``VmRSS`` sampled (``"rss_sampled"``), with the
  caveat above;
- CUDA: the caching allocator's ``max_memory_allocated`` when the block raised it, exactly
  (``"cuda_max_delta"``), else the highest ``memory_allocated`` sampled (``"cuda_sampled"``).

A sampled peak is a lower bound that misses spikes shorter than the interval. The reported
``peak_bytes`` is the peak minus the level at entry.

:class:`TensorBytes` counts instead of sampling: the bytes of the tensors created inside a
block and still alive, and their highest level (every operator's new output storages, seen
by a ``TorchDispatchMode``; each one's bytes taken off when its storage is freed). It reads
the same in a fresh process and in one that has computed before, on CPU and CUDA, whatever
the allocator keeps or the sampler misses, so the planner measures one sample with it: the
sampled peak of a one-sample forward that lasts a few milliseconds read 17 MB in a fresh
process and 7 to 14 MB in a warm one, where its tensors peak at 13.2 MB every time.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

logger = logging.getLogger(__name__)

_STATUS = "/proc/self/status"
#: Seconds between two samples of the current level (about 30 us of work each).
SAMPLE_SECONDS = 0.005


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


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    ]


_MALLOC_READER: list[Callable[[], int] | None] = []


def malloc_in_use_reader() -> Callable[[], int] | None:
    """A function giving the bytes glibc's allocator has handed out and not taken back, or ``None``.

    ``mallinfo2()`` (glibc 2.33 and later): ``uordblks`` (in use in the arenas, every
    thread's) plus ``hblkhd`` (mmapped chunks). About 6 us a call. ``None`` without glibc.
    """
    if not _MALLOC_READER:
        reader = None
        try:
            libc = ctypes.CDLL(None)
            mallinfo2 = libc.mallinfo2
            mallinfo2.restype = _MallInfo2
            mallinfo2.argtypes = []

            def reader() -> int:
                info = mallinfo2()
                return int(info.uordblks + info.hblkhd)

            reader()
        except (OSError, AttributeError, TypeError, ValueError):
            reader = None
        _MALLOC_READER.append(reader)
    return _MALLOC_READER[0]


class _Sampler:
    """A daemon thread keeping the maximum of ``read()`` until :meth:`stop`."""

    def __init__(self, read: Any, interval: float) -> None:
        self.read, self.interval = read, interval
        self.maximum = read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="uma-peak-memory", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.maximum = max(self.maximum, self.read())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.maximum = max(self.maximum, self.read())
        return self.maximum


class PeakMemory:
    """Context manager: ``peak_bytes`` = peak memory above the level at entry (see the module docstring).

    Args:
        device: where the computation runs (``cuda`` uses allocator stats, else the
            process RSS).
        interval: seconds between samples of the current level.

    Example:
        >>> with PeakMemory("cpu") as meter:
        ...     x = torch.ones(1_000_000)
        >>> meter.peak_bytes >= 0
        True
    """

    def __init__(self, device: torch.device | str = "cpu", interval: float = SAMPLE_SECONDS) -> None:
        self.device = torch.device(device)
        self.interval = interval
        self.peak_bytes = 0
        self.method = ""
        self._start = 0
        self._mark = 0
        self._sampler: _Sampler | None = None
        self._malloc = False

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            self._mark = torch.cuda.max_memory_allocated(self.device)
            device = self.device
            self._sampler = _Sampler(lambda: torch.cuda.memory_allocated(device), self.interval)
        else:
            reader = malloc_in_use_reader()
            self._malloc = reader is not None
            read = reader if reader is not None else cpu_rss_bytes
            self._start = read()
            self._mark = cpu_peak_rss_bytes()
            self._sampler = _Sampler(read, self.interval)
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._sampler is not None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            sampled = self._sampler.stop()
            mark = torch.cuda.max_memory_allocated(self.device)
            kinds = ("cuda_max_delta", "cuda_sampled")
        else:
            sampled = self._sampler.stop()
            if self._malloc:  # the same measure at every step, whatever the process's pages did before
                self.peak_bytes, self.method = max(0, sampled - self._start), "malloc_sampled"
                self._sampler = None
                return
            mark = cpu_peak_rss_bytes()
            kinds = ("vmhwm_delta", "rss_sampled")
        if mark > self._mark:
            peak, self.method = mark, kinds[0]
        else:
            peak, self.method = sampled, kinds[1]
        self.peak_bytes = max(0, peak - self._start)
        self._sampler = None


class TensorBytes(TorchDispatchMode):
    """Context manager: bytes of the tensors created inside the block and still alive, and their peak.

    Every operator's outputs are seen below autograd (``TorchDispatchMode``, so a backward
    run inside the block is seen too); an output storage that is none of the operator's
    inputs' (not a view, not written in place) and not counted yet is new: its bytes are
    added to ``level``, and taken off when the storage is freed (a weak reference's
    callback). ``peak_bytes`` is the highest ``level`` since entry or since the last
    :meth:`mark`. Tensors that existed before the block are never counted, nor their frees.

    Not counted: memory an operator uses inside itself and frees before it returns (a
    kernel's workspace), allocations outside tensors, and a storage resized in place
    (``UntypedStorage.resize_``, as FSDP2 frees its gathered parameters: counted as still held).

    Example:
        >>> with TensorBytes() as counted:
        ...     x = torch.ones(1000)  # 4000 bytes
        ...     y = (x * 2).sum()     # 4000 more, freed at once; y holds 4
        ...     del x
        >>> counted.peak_bytes, counted.level
        (8004, 4)
    """

    def __init__(self) -> None:
        super().__init__()
        self.level = 0
        self.peak_bytes = 0
        self._held: dict[int, weakref.ref] = {}
        self._lock = threading.RLock()  # a free may run its callback inside the lock (a collection)

    def mark(self) -> int:
        """Start a new peak at the present level; returns that level."""
        with self._lock:
            self.peak_bytes = self.level
            return self.level

    def _freed(self, key: int, nbytes: int) -> None:
        with self._lock:
            if self._held.pop(key, None) is not None:
                self.level -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {id(s) for t in tree_flatten((args, kwargs))[0] for s in _storages(t)}
        for t in tree_flatten(out)[0]:
            for storage in _storages(t):
                key = id(storage)
                if key in inputs or key in self._held:
                    continue
                nbytes = storage.nbytes()
                with self._lock:
                    self._held[key] = weakref.ref(storage, lambda _ref, k=key, b=nbytes: self._freed(k, b))
                    self.level += nbytes
                    self.peak_bytes = max(self.peak_bytes, self.level)
        return out


def _storages(value: Any) -> list[Any]:
    """The untyped storages under ``value``: a tensor's own, a wrapper subclass's inner tensors'; none for anything else."""
    if not isinstance(value, torch.Tensor):
        return []
    if is_traceable_wrapper_subclass(value):  # DTensor and kin: the tensors it wraps
        names, _ = value.__tensor_flatten__()
        return [s for name in names for s in _storages(getattr(value, name, None))]
    try:
        return [value.untyped_storage()]
    except (RuntimeError, NotImplementedError, TypeError):  # no plain storage (a meta or sparse tensor)
        return []


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

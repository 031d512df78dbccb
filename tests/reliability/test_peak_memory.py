"""Issue 17: measuring a metric's peak memory leaves the process's own peak counter alone.

Every metric used to write ``5`` to ``/proc/self/clear_refs``, resetting ``VmHWM`` (what
``ru_maxrss``-style monitoring reads). :class:`~uma_callbacks.core.peak_memory.PeakMemory`
now reads the mark before and after and samples the level in between.
"""

from __future__ import annotations

import mmap
import sys

import pytest
import torch

from tests.cases import mlp_case
from uma_callbacks.core import peak_memory
from uma_callbacks.core.peak_memory import PeakMemory, cpu_peak_rss_bytes
from uma_callbacks.metrics import METRICS

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")

MiB = 2**20


def _touched(n_bytes: int) -> mmap.mmap:
    block = mmap.mmap(-1, n_bytes)
    for offset in range(0, n_bytes, 4096):
        block[offset] = 1
    return block


def _raise_the_mark(n_bytes: int) -> None:
    _touched(n_bytes).close()  # VmHWM now at least this much above the current level


def test_a_metric_does_not_reset_the_processs_peak(tmp_path):
    _raise_the_mark(256 * MiB)
    mark = cpu_peak_rss_bytes()
    assert mark > 0
    model, batches, loss_fn = mlp_case()
    for name in ("gradient_flow", "fisher"):
        result = METRICS[name](**({"top_k": 2} if name == "fisher" else {})).compute(model, batches, loss_fn=loss_fn)
        assert result.status == "ok"
        assert result.meta["peak_bytes"] >= 0
    assert cpu_peak_rss_bytes() >= mark  # never lowered


@pytest.fixture
def rss_reading(monkeypatch):
    """The resident-set reading (no glibc ``mallinfo2``); these blocks are raw mmaps, not malloc's."""
    monkeypatch.setattr(peak_memory, "_MALLOC_READER", [None])


def test_peak_below_an_earlier_mark_is_sampled(rss_reading):
    _raise_the_mark(256 * MiB)
    mark = cpu_peak_rss_bytes()
    with PeakMemory("cpu", interval=0.001) as meter:
        block = _touched(64 * MiB)  # held to the end: below the mark, seen by the samples
    block.close()
    assert meter.method == "rss_sampled" and meter.peak_bytes >= 32 * MiB
    assert cpu_peak_rss_bytes() >= mark


def _resident_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def test_peak_above_the_mark_is_exact(rss_reading):
    with PeakMemory("cpu") as meter:  # the resident set rises past the mark by 64 MiB (and 2 of slack): a new high-water mark
        block = _touched(max(0, cpu_peak_rss_bytes() - _resident_bytes()) + 66 * MiB)
        block.close()  # gone before the end: only the mark shows it
    assert meter.method == "vmhwm_delta" and meter.peak_bytes >= 64 * MiB


def test_the_sampling_thread_ends():
    import threading

    with PeakMemory("cpu"):
        torch.ones(10)
    assert not [t for t in threading.enumerate() if t.name == "uma-peak-memory"]

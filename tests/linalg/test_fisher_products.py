"""The Fisher sums' accumulators: their error does not grow with the number of chunks."""

from __future__ import annotations

import pytest
import torch

from uma_callbacks.linalg.fisher_products import _RunningSum


@pytest.mark.parametrize("device_type", ["cpu", "mps-like"])
def test_accumulated_chunk_sums_stay_accurate(device_type, monkeypatch):
    """10,000 float32 chunk sums of very different sizes: the total equals the float64 sum of
    the same float32 values to float32 rounding, whether held in float64 (CPU) or as a
    Kahan-compensated float32 (a device without float64, imitated here)."""
    gen = torch.Generator().manual_seed(0)
    chunks = [torch.rand(64, generator=gen) * (1e4 if i == 0 else 1.0) for i in range(10_000)]
    acc = _RunningSum(chunks[0], torch.float32)
    if device_type == "mps-like":
        acc._wide = False
    for c in chunks:
        acc.add(c)
    want = torch.stack([c.double() for c in chunks]).sum(0)
    assert acc.total.dtype == torch.float32
    torch.testing.assert_close(acc.total.double(), want, rtol=2e-7, atol=0)
    naive = torch.zeros(64)
    for c in chunks:
        naive += c
    assert float(((naive.double() - want).abs() / want).max()) > 2e-6  # what the accumulator avoids


def test_float64_sums_are_exact_float64_adds():
    a = _RunningSum(torch.zeros(3, dtype=torch.float64), torch.float64)
    for x in (torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), torch.tensor([1e-17, 0.0, -3.0], dtype=torch.float64)):
        a.add(x)
    assert a.total.dtype == torch.float64 and a.total.tolist() == [1.0, 2.0, 0.0]

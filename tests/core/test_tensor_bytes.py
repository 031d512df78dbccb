"""TensorBytes: the bytes of the tensors a block creates, counted (not sampled), and their peak."""

from __future__ import annotations

import torch

from uma_callbacks.core.peak_memory import TensorBytes


def test_new_storages_are_counted_views_and_in_place_writes_are_not():
    before = torch.zeros(1000)  # made outside the block: never counted
    with TensorBytes() as counted:
        view = before[:500]  # a view of an earlier tensor
        before.add_(1.0)  # written in place
        assert counted.level == 0
        fresh = before * 2  # 4000 bytes
        same = fresh.view(10, 100)  # its view: nothing new
        assert counted.level == counted.peak_bytes == 4000
        del fresh, same
        assert counted.level == 0 and counted.peak_bytes == 4000
    del view


def test_a_backward_inside_the_block_is_counted_and_mark_starts_a_new_peak():
    w = torch.randn(100, 100, requires_grad=True)
    x = torch.randn(50, 100)
    with TensorBytes() as counted:
        loss = (x @ w).tanh().sum()
        forward_end = counted.mark()
        assert forward_end > 0 and counted.peak_bytes == forward_end
        (grad,) = torch.autograd.grad(loss, [w])
        assert counted.peak_bytes >= forward_end + grad.numel() * grad.element_size()
        del loss, grad
    assert counted.level == 0


def test_the_same_work_counts_the_same_bytes_every_time():
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 10))
    x = torch.randn(32, 64)
    peaks = []
    for _ in range(3):
        with TensorBytes() as counted:
            model(x).logsumexp(-1).sum().backward()
        peaks.append(counted.peak_bytes)
        model.zero_grad(set_to_none=True)
    assert len(set(peaks)) == 1 and peaks[0] > 0

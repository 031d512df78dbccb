"""Issue 17: a NaN in a buffer (BatchNorm ``running_var``, rotary ``inv_freq``) is named in the error."""

from __future__ import annotations

import pytest
import torch

from tests.trainer_cases import tiny_lm
from uma_callbacks.metrics import METRICS
from uma_callbacks.metrics.base import check_finite_weights


class BatchNormNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 4)
        self.bn = torch.nn.BatchNorm1d(4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.bn(self.fc(x)))


def _loss(model, batch):
    return ((model(batch["x"]) - batch["y"]) ** 2).sum(-1)


def test_nan_in_batchnorm_running_var_is_named():
    model = BatchNormNet()
    model.bn.running_var[1] = float("nan")
    batches = [{"x": torch.randn(4, 3), "y": torch.randn(4, 2)}]
    with pytest.raises(FloatingPointError, match=r"buffer 'bn.running_var' holds 1 NaN"):
        METRICS["gradient_flow"]().compute(model, batches, loss_fn=_loss)


def test_nan_in_rotary_inv_freq_is_named():
    model = tiny_lm()
    name, buf = next((n, b) for n, b in model.named_buffers() if n.endswith("inv_freq"))
    buf[0] = float("nan")
    with pytest.raises(FloatingPointError, match=f"buffer '{name}'"):
        check_finite_weights(model)


def test_minus_inf_masks_and_integer_buffers_pass():
    model = BatchNormNet()
    model.register_buffer("mask", torch.full((2, 2), float("-inf")))
    check_finite_weights(model)  # num_batches_tracked (int) and a -inf mask are fine

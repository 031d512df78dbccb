"""Which device a model is on: the one helper the metrics, the budget and the suite use."""

from __future__ import annotations

import torch


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter; the CPU for a model without parameters.

    Example:
        >>> model_device(torch.nn.Linear(2, 1))
        device(type='cpu')
        >>> model_device(torch.nn.ReLU())
        device(type='cpu')
    """
    for p in model.parameters():
        return p.device
    return torch.device("cpu")

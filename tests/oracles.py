"""Brute-force references in float64: one backward per sample, dense Hessians, direct losses."""

from __future__ import annotations

import copy
from typing import Any

import torch

from tests.cases import split_samples


def _double(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).double().eval()


def oracle_per_sample_grads(model: torch.nn.Module, batches: list[Any], loss_fn) -> tuple[list[str], torch.Tensor]:
    """``(names, G [N, P])``: stacked per-sample gradients, one backward per sample, float64."""
    model = _double(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for batch in batches:
        for one in split_samples(batch):
            grads = torch.autograd.grad(loss_fn(model, one).sum(), params, allow_unused=True)
            rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]))
    return names, torch.stack(rows)


def param_slices(model: torch.nn.Module) -> dict[str, slice]:
    """``{name: slice}`` of each trainable parameter in the flat vector [P]."""
    out, start = {}, 0
    for n, p in model.named_parameters():
        if p.requires_grad:
            out[n] = slice(start, start + p.numel())
            start += p.numel()
    return out


def oracle_probe_loss(model: torch.nn.Module, batches: list[Any], loss_fn) -> float:
    """L = (1/N) sum_i l_i by direct evaluation."""
    with torch.no_grad():
        losses = torch.cat([loss_fn(model, b).reshape(-1).double() for b in batches])
    return losses.mean().item()


def oracle_hessian(model: torch.nn.Module, batches: list[Any], loss_fn) -> torch.Tensor:
    """Dense Hessian [P, P] of the probe loss L, by torch.func.hessian in float64."""
    from torch.func import functional_call, hessian

    model = _double(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in model.named_parameters() if p.requires_grad]
    flat0 = torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters() if p.requires_grad])

    class _Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, batch):
            return loss_fn(self.m, batch)

    wrap = _Wrap(model)

    def total_loss(flat: torch.Tensor) -> torch.Tensor:
        params, start = {}, 0
        for n, s in zip(names, shapes):
            numel = int(torch.tensor(s).prod().item()) if len(s) else 1
            params[f"m.{n}"] = flat[start : start + numel].reshape(s)
            start += numel
        losses = torch.cat([functional_call(wrap, params, (b,), strict=False).reshape(-1) for b in batches])
        return losses.mean()

    return hessian(total_loss)(flat0)

"""The per-sample loss of one run, decided once and passed down.

:func:`resolve_loss` picks the user's ``loss_fn`` or the HF default
(:func:`~uma_callbacks.core.losses.resolve_loss_fn`), checks the probe's labels against the
model's head when the default is used (:func:`~uma_callbacks.core.losses.check_labels_fit`),
and wraps the loss so that a NaN/Inf per-sample loss raises. The suite resolves it once
per save and hands the :class:`ResolvedLoss` to the time plan, the memory plan and every
metric's :meth:`~uma_callbacks.metrics.base.Metric.compute`, which take it as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from uma_callbacks.core.losses import LossFn, check_labels_fit, resolve_loss_fn


@dataclass(frozen=True)
class ResolvedLoss:
    """A per-sample loss ``loss(model, batch) -> Tensor[B]`` whose choice is made.

    Calling it runs :attr:`raw` and raises ``FloatingPointError`` on a NaN/Inf per-sample
    loss (values inside ``torch.func`` transforms are not inspectable; the per-sample
    gradient code checks what ``vmap`` returns instead).

    Attributes:
        given: what the user gave (``None``: the HF default).
        raw: the loss itself, unchecked (the time plan times it as training runs it).
    """

    given: LossFn | None
    raw: LossFn

    def __call__(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """The per-sample losses of ``batch``, checked finite where they can be read."""
        from uma_callbacks.linalg.per_sample import check_finite_losses

        out = self.raw(model, batch)
        if isinstance(out, torch.Tensor) and not torch._C._functorch.is_functorch_wrapped_tensor(out):
            check_finite_losses(out)
        return out


def resolve_loss(model: torch.nn.Module, loss_fn: LossFn | ResolvedLoss | None, batches: Sequence[Any]) -> ResolvedLoss:
    """The :class:`ResolvedLoss` for ``loss_fn`` on ``model`` (one already resolved is returned as is).

    ``loss_fn`` must be callable, and (default loss) the probe's labels must fit the model's
    head: ``ValueError`` otherwise (from :mod:`uma_callbacks.core.losses`).
    """
    if isinstance(loss_fn, ResolvedLoss):
        return loss_fn
    if loss_fn is None:
        check_labels_fit(model, batches)
    return ResolvedLoss(given=loss_fn, raw=resolve_loss_fn(model, loss_fn))

"""Per-sample gradients g_i = grad_theta l_i(theta), a chunk at a time, with ``torch.func``.

For a chunk of B samples, :func:`per_sample_grads` returns the losses ``[B]`` and, per
trainable parameter of shape ``S``, the stacked gradients ``[B, *S]``: one ``vmap`` over
``grad`` of the single-sample loss, never one backward per sample. The model is called
with the parameters swapped in place for the call (:func:`swapped_parameters`: every slot
holding a parameter, so a module used twice or tied weights see the same tensor, and the
very same ``nn.Parameter`` objects are back afterwards), so any user
``loss_fn(model, batch)`` works unchanged; each vmapped call sees a batch of one.

HF attention is switched to eager for the call (SDPA's mask code branches on data,
which ``vmap`` refuses); see :func:`uma_callbacks.core.model_state.eager_attention`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import grad_and_value, vmap

from uma_callbacks.core.batches import map_tensors
from uma_callbacks.core.losses import LossFn
from uma_callbacks.core.model_state import eager_attention


def check_finite_losses(losses: torch.Tensor) -> None:
    """Raise ``FloatingPointError`` naming the samples whose loss is NaN or Inf.

    A NaN loss would otherwise turn every statistic into NaN and reach the dashboard as
    a plausible-looking gap; it becomes an error record instead.

    Raises:
        FloatingPointError: some sample's loss is NaN or Inf (the first eight are named).
    """
    finite = torch.isfinite(losses.detach())
    if not bool(finite.all()):
        bad = (~finite).reshape(-1).nonzero().reshape(-1).tolist()
        raise FloatingPointError(
            f"the per-sample loss is NaN/Inf for sample(s) {bad[:8]} of a probe chunk of {finite.numel()} "
            "(weights are finite: check the inputs, the labels and the loss function)"
        )


#: transformers' shortcuts that skip building an attention mask when no token is padded;
#: they test ``padding_mask.all()``, a data-dependent branch that ``vmap`` refuses.
_MASK_SHORTCUTS = ("_ignore_bidirectional_mask_sdpa", "_ignore_causal_mask_sdpa")


@contextlib.contextmanager
def _materialised_hf_masks() -> Iterator[None]:
    """Within the block, transformers always builds the attention mask; restored on exit.

    It never takes the "no padding, skip the mask" shortcut. The mask it builds is exact, so
    results are the same; only the branch on the data, which ``vmap`` cannot take, is
    avoided. Encoder models (BERT) take that branch even with eager attention.
    """
    try:
        from transformers import masking_utils
    except ImportError:  # transformers is optional for plain nn.Modules
        yield
        return
    saved = {name: getattr(masking_utils, name) for name in _MASK_SHORTCUTS if hasattr(masking_utils, name)}
    try:
        for name in saved:
            setattr(masking_utils, name, lambda *args, **kwargs: False)
        yield
    finally:
        for name, fn in saved.items():
            setattr(masking_utils, name, fn)


def parameter_slots(model: torch.nn.Module, params: Mapping[str, torch.Tensor]) -> dict[str, list[tuple[torch.nn.Module, str]]]:
    """``{name: [(module, attribute)]}``: every place that holds each parameter object.

    A module used twice, or tied weights: one parameter, several slots.
    """
    by_id = {id(p): n for n, p in params.items()}
    slots: dict[str, list[tuple[torch.nn.Module, str]]] = {n: [] for n in params}
    seen: set[tuple[int, str]] = set()
    for _, module in model.named_modules(remove_duplicate=False):
        for attr, p in module._parameters.items():
            if p is not None and id(p) in by_id and (id(module), attr) not in seen:
                seen.add((id(module), attr))
                slots[by_id[id(p)]].append((module, attr))
    return slots


@contextlib.contextmanager
def swapped_parameters(slots: Mapping[str, list[tuple[torch.nn.Module, str]]], tensors: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, every slot of each named parameter holds ``tensors[name]``.

    On exit each slot holds its original ``nn.Parameter`` object again (even when the same
    module is reached twice, where ``torch.func.functional_call`` restores a wrapped tensor).
    """
    saved = [(module, attr, module._parameters[attr]) for name in tensors for module, attr in slots[name]]
    try:
        for name, tensor in tensors.items():
            for module, attr in slots[name]:
                module._parameters[attr] = tensor
        yield
    finally:
        for module, attr, original in saved:
            module._parameters[attr] = original


def flatten_params(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Concatenate ``{name: tensor}`` (model order) into one vector ``[P]``."""
    return torch.cat([t.reshape(-1) for t in tensors.values()])


@dataclass
class PerSampleGradients:
    """Output of :func:`per_sample_grads` for one chunk.

    Attributes:
        losses: ``[B]`` per-sample losses (detached).
        grads: ``{param name: [B, *param.shape]}``.
    """

    losses: torch.Tensor
    grads: dict[str, torch.Tensor]

    def sq_norms(self) -> dict[str, torch.Tensor]:
        """``{param name: [B]}`` squared norms ||g_{i,p}||^2 of each sample's gradient."""
        # a norm reduction, not g**2: no temporary as large as the gradients
        return {n: torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1).pow(2) for n, g in self.grads.items()}

    def flat(self) -> torch.Tensor:
        """The stacked gradients as one matrix ``G [B, P]`` (a copy)."""
        return torch.cat([g.reshape(g.shape[0], -1) for g in self.grads.values()], dim=1)


def per_sample_grads(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batch: Any,
    params: Mapping[str, torch.Tensor] | None = None,
) -> PerSampleGradients:
    """Per-sample losses and gradients of a chunk, by ``vmap(grad_and_value)``.

    Args:
        model: the model (its parameters are read, never written).
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]``.
        batch: a chunk of B samples (dict/list/tuple of tensors, batch dim 0).
        params: ``{name: tensor}`` to differentiate; default the trainable parameters.

    Returns:
        :class:`PerSampleGradients` with ``losses [B]`` and ``grads {name: [B, *shape]}``.
    """
    if params is None:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    slots = parameter_slots(model, params)
    detached = {n: p.detach() for n, p in params.items()}

    def one_sample_loss(theta: dict[str, torch.Tensor], sample: Any) -> torch.Tensor:
        one = map_tensors(sample, lambda t: t.unsqueeze(0))
        with swapped_parameters(slots, theta):
            return loss_fn(model, one).reshape(())

    # no graph to parameters left out of ``params`` (grad ignores the outer no_grad)
    with eager_attention(model), _materialised_hf_masks(), torch.no_grad():
        grads, losses = vmap(grad_and_value(one_sample_loss), in_dims=(None, 0))(detached, batch)
    check_finite_losses(losses)
    return PerSampleGradients(losses=losses.detach(), grads={n: grads[n] for n in params})


def iter_per_sample_grads(
    model: torch.nn.Module, loss_fn: LossFn, chunks: Iterator[Any]
) -> Iterator[PerSampleGradients]:
    """:func:`per_sample_grads` for each chunk of ``chunks`` (a generator, one chunk alive)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for chunk in chunks:
        yield per_sample_grads(model, loss_fn, chunk, params)

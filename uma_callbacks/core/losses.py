"""Per-sample loss adapters: ``loss_fn(model, batch) -> Tensor[B]``.

Every metric is defined on per-sample losses l_i. The probe loss is L = (1/N) sum_i l_i.

- Causal LM (the model returns ``logits [B, T, V]`` and the batch has ``labels [B, T]``):
  l_i = mean over valid tokens t of CE(logits[i, t-1], labels[i, t]) (labels shifted by one,
  ``-100`` ignored). A sequence whose labels are all ``-100`` has l_i = 0 and no gradient.
- Sequence classification (``logits [B, C]``, ``labels [B]``): l_i = CE(logits[i], labels[i]);
  ``labels`` of float dtype with ``logits [B]`` or ``[B, 1]`` are taken as regression (squared error).
- Anything else: the user's ``loss_fn``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]

#: Label value ignored by the token-level losses (the HF convention).
IGNORE_INDEX = -100


def causal_lm_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token cross-entropies with labels shifted by one.

    Args:
        logits: ``[B, T, V]``.
        labels: ``[B, T]``, ``-100`` where ignored.

    Returns:
        ``(token_losses [B, T-1], valid [B, T-1])``; ``token_losses`` is 0 where not valid.
    """
    shift_logits = logits[:, :-1, :]
    shift_labels = labels[:, 1:]
    valid = shift_labels != IGNORE_INDEX
    safe_labels = shift_labels.masked_fill(~valid, 0)
    log_probs = torch.log_softmax(shift_logits, dim=-1)
    token_losses = -log_probs.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    return token_losses * valid.to(token_losses.dtype), valid


def causal_lm_per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """l_i = (1/|valid_i|) sum_t CE(logits[i, t-1], labels[i, t]); 0 when no token is valid.

    Args:
        logits: ``[B, T, V]``.
        labels: ``[B, T]``.

    Returns:
        ``[B]`` per-sequence mean token cross-entropy.
    """
    token_losses, valid = causal_lm_token_losses(logits, labels)
    counts = valid.sum(dim=-1).clamp(min=1).to(token_losses.dtype)
    return token_losses.sum(dim=-1) / counts


def classification_per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy (integer labels) or squared error (float labels, one output).

    Args:
        logits: ``[B, C]`` (or ``[B]`` / ``[B, 1]`` for regression).
        labels: ``[B]``.

    Returns:
        ``[B]``.
    """
    if labels.is_floating_point() and (logits.dim() == 1 or logits.shape[-1] == 1):
        return (logits.reshape(labels.shape) - labels) ** 2
    return F.cross_entropy(logits, labels.long(), reduction="none")


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The batch without ``labels`` (we compute the loss ourselves, per sample)."""
    return {k: v for k, v in batch.items() if k != "labels"}


def hf_per_sample_loss(model: torch.nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """Default loss for HF-style models: causal LM when ``logits`` has 3 dims, else classification.

    Args:
        model: returns an object with ``.logits`` (or a tuple whose first item is logits).
        batch: dict with ``labels`` and the model's inputs.

    Returns:
        ``[B]`` per-sample losses.

    Raises:
        ValueError: the batch has no ``labels``.
    """
    if not isinstance(batch, Mapping) or "labels" not in batch:
        raise ValueError(
            "probe batches need 'labels' for the default loss; pass labels in the probe or a loss_fn"
        )
    outputs = model(**model_inputs(batch))
    logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
    labels = batch["labels"]
    if logits.dim() == 3:
        return causal_lm_per_sample_loss(logits, labels)
    return classification_per_sample_loss(logits, labels)


def resolve_loss_fn(model: torch.nn.Module, loss_fn: LossFn | None) -> LossFn:
    """The user's ``loss_fn`` if given, else :func:`hf_per_sample_loss`.

    Raises:
        ValueError: ``loss_fn`` is given but not callable.
    """
    if loss_fn is not None:
        if not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable(model, batch) -> Tensor[B]; got {loss_fn!r}")
        return loss_fn
    return hf_per_sample_loss


def check_labels_fit(model: torch.nn.Module, batches: Any) -> None:
    """Refuse integer ``labels`` that the model's head cannot score, before any forward.

    The head's size is ``config.num_labels`` for sequence classification and
    ``config.vocab_size`` for language models (``-100`` is always allowed: ignored).

    Raises:
        ValueError: a label outside ``[0, size)``, naming the field, the values and the size.
    """
    config = getattr(model, "config", None)
    if config is None:
        return
    archs = " ".join(getattr(config, "architectures", None) or [type(model).__name__])
    classify = "SequenceClassification" in archs or "SequenceClassification" in type(model).__name__
    size = getattr(config, "num_labels", None) if classify else getattr(config, "vocab_size", None)
    if not isinstance(size, int) or size <= 0:
        return
    for batch in batches:
        labels = batch.get("labels") if isinstance(batch, Mapping) else None
        if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.numel() == 0:
            continue
        valid = labels[labels != -100]
        if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= size):
            what = "num_labels" if classify else "vocab_size"
            raise ValueError(
                f"probe labels range over [{int(valid.min())}, {int(valid.max())}] but the model's head has {size} "
                f"outputs (config.{what}); the probe was made for another model or task (labels must be in "
                f"[0, {size}) or -100)"
            )

"""Labels drawn from the model's own predictive distribution, for the Monte Carlo Fisher.

The MC Fisher replaces each sample's labels by labels drawn from the model
(:func:`sample_mc_labels`, seeded per sample so the draws do not depend on chunking or
sharding); :func:`group_draws` packs the drawn copies of a chunk into batches.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch

from uma_callbacks.core.batches import count_samples, map_tensors, select_samples
from uma_callbacks.core.losses import IGNORE_INDEX, model_inputs


def sample_mc_labels(model: torch.nn.Module, batch: Any, seed: int, draws: int = 1) -> list[Any]:
    """Copies of the batch with ``labels`` drawn from the model's own predictive distribution.

    Causal LMs (``logits [B, T, V]``): label t (t >= 1) is drawn from softmax(logits[:, t-1])
    wherever the given label is not ``-100`` (ignored positions stay ignored). Classification
    (``logits [B, C]``, integer labels): one class per example. One forward serves all
    draws. Each sample draws from its own generator, seeded from (``seed``, ``draws``, the
    bytes of the sample's inputs), so the draws do not depend on how the probe is chunked
    or sharded.

    Args:
        model: returns an output with ``.logits`` (or a tuple whose first item is logits).
        batch: a dict with ``labels`` and the model's inputs.
        seed: the recorded MC seed.
        draws: label draws per sample.

    Returns:
        ``draws`` shallow copies of ``batch`` with new ``labels`` (same dtype and device).

    Raises:
        ValueError: the batch is not a dict with ``labels``, the output has no logits, or
            the labels are not integer class labels.
    """
    if not isinstance(batch, Mapping) or "labels" not in batch:
        raise ValueError(
            "FisherInformation.kind='mc' samples labels from the model: it needs HF-style batches "
            "(dicts with 'labels') and a model output with .logits; use kind='empirical' otherwise"
        )
    labels = batch["labels"]
    if labels.is_floating_point():
        raise ValueError("FisherInformation.kind='mc' needs integer class labels; got float labels (regression)")
    with torch.no_grad():
        outputs = model(**model_inputs(batch))
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, (tuple, list)):
        logits = outputs[0]
    if not isinstance(logits, torch.Tensor):
        raise ValueError("FisherInformation.kind='mc' needs a model output with .logits")
    probs = torch.softmax(logits.detach().double(), dim=-1)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    new = [labels.clone() for _ in range(draws)]
    for i in range(count_samples(batch)):
        gen = torch.Generator(device=probs.device).manual_seed(_sample_seed(select_samples(inputs, [i]), seed, draws))
        if logits.dim() == 3:
            drawn = torch.multinomial(probs[i, :-1], draws, replacement=True, generator=gen)  # [T-1, draws]
            keep = labels[i, 1:] != IGNORE_INDEX
            for d in range(draws):
                new[d][i, 1:] = torch.where(keep, drawn[:, d].to(labels.dtype), labels[i, 1:])
        else:
            drawn = torch.multinomial(probs[i], draws, replacement=True, generator=gen).to(labels.dtype)
            for d in range(draws):
                new[d][i] = drawn[d]
    return [{**batch, "labels": lab} for lab in new]


def group_draws(labeled: list[Any], rows: int) -> list[Any]:
    """Concatenate consecutive label-drawn copies of a chunk into batches of at most ``rows`` rows."""
    per = max(1, rows // count_samples(labeled[0]))
    out = []
    for start in range(0, len(labeled), per):
        group = labeled[start : start + per]
        out.append(group[0] if len(group) == 1 else {k: torch.cat([g[k] for g in group]) if isinstance(v, torch.Tensor) else v for k, v in group[0].items()})
    return out


def _sample_seed(sample: Any, seed: int, draw: int) -> int:
    digest = hashlib.sha256(f"{seed}|{draw}|".encode())

    def visit(t: torch.Tensor) -> torch.Tensor:
        digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return t

    map_tensors(sample, visit)
    return int.from_bytes(digest.digest()[:8], "little") & ((1 << 63) - 1)

"""Batches as the metrics see them: count, split, select and move samples, fingerprint.

A batch is a dict of tensors with a leading batch dimension (or any object ``loss_fn``
understands; then these helpers see no tensors and treat it as one sample).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch


def count_samples(batch: Any) -> int:
    """Number of samples in a batch: the leading dim of its first tensor.

    Raises:
        ValueError: the batch holds no tensor.
    """
    tensor = _first_tensor(batch)
    if tensor is None:
        raise ValueError(f"cannot count samples in a batch of type {type(batch).__name__}: no tensor in it")
    return int(tensor.shape[0]) if tensor.dim() > 0 else 1


def sequence_length(batch: Any) -> int:
    """Tokens per sample, for chunking by tokens.

    Dim 1 of the batch's first integer tensor with at least 2 dims (``input_ids [B, T]``,
    ``attention_mask``); else, of its first floating tensor with at least 3 dims, the
    product of the dims between the batch and the last (``inputs_embeds [B, T, H]``: T);
    else 1. A floating ``[B, D]`` tensor holds D features of one row, not D tokens.

    Example:
        >>> ids = {"input_ids": torch.zeros(4, 128, dtype=torch.long)}
        >>> sequence_length(ids), sequence_length(torch.zeros(4)), sequence_length({"x": torch.zeros(32, 256)})
        (128, 1, 1)
        >>> sequence_length({"inputs_embeds": torch.zeros(4, 64, 32), "labels": torch.zeros(4)})
        64
    """
    tensors: list[torch.Tensor] = []

    def visit(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            tensors.append(obj)
        elif isinstance(obj, Mapping):
            for value in obj.values():
                visit(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                visit(value)

    visit(batch)
    for t in tensors:
        if t.dim() >= 2 and not (t.is_floating_point() or t.is_complex()):
            return int(t.shape[1])
    for t in tensors:
        if t.dim() >= 3 and t.is_floating_point():
            return max(1, int(torch.Size(t.shape[1:-1]).numel()))
    return 1


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        for value in batch.values():
            found = _first_tensor(value)
            if found is not None:
                return found
    if isinstance(batch, (list, tuple)):
        for value in batch:
            found = _first_tensor(value)
            if found is not None:
                return found
    return None


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """Apply ``fn`` to every tensor in a nested dict/list/tuple batch."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return type(batch)({k: map_tensors(v, fn) for k, v in batch.items()}) if isinstance(
            batch, dict
        ) else {k: map_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(map_tensors(v, fn) for v in batch)
    if isinstance(batch, list):
        return [map_tensors(v, fn) for v in batch]
    return batch


def split_batch(batch: Any, chunk_size: int) -> list[Any]:
    """Cut a batch into consecutive chunks of at most ``chunk_size`` samples (dim 0)."""
    n = count_samples(batch)
    if n <= chunk_size:
        return [batch]
    return [map_tensors(batch, lambda t, s=start: t[s : s + chunk_size]) for start in range(0, n, chunk_size)]


def select_samples(batch: Any, index: torch.Tensor | Sequence[int]) -> Any:
    """The samples at ``index`` (dim 0) of every tensor of a batch."""
    idx = torch.as_tensor(index, dtype=torch.long)
    return map_tensors(batch, lambda t: t.index_select(0, idx.to(t.device)))


def move_batch(batch: Any, device: torch.device | str) -> Any:
    """The batch with every tensor on ``device``."""
    return map_tensors(batch, lambda t: t.to(device))


def fingerprint_batches(batches: Iterable[Any]) -> str:
    """SHA-256 hex over each tensor's key path, dtype, shape and raw bytes."""
    digest = hashlib.sha256()

    def visit(obj: Any, path: str) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            digest.update(f"{path}|{t.dtype}|{tuple(t.shape)}|".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(obj, Mapping):
            for key in sorted(obj, key=str):
                visit(obj[key], f"{path}/{key}")
        elif isinstance(obj, (list, tuple)):
            for i, value in enumerate(obj):
                visit(value, f"{path}[{i}]")
        else:
            digest.update(f"{path}={json.dumps(obj, default=str)}".encode())

    for i, batch in enumerate(batches):
        visit(batch, f"#{i}")
    return digest.hexdigest()

"""Weights a metric compares with (a base, other models), given as weights or named by a path.

Metrics never read checkpoint folders themselves (only the layer that knows checkpoints on
disk does): a folder is read by the loader the package registers at import
(:func:`register_folder_loader`; ``uma_callbacks/__init__.py`` registers
:func:`uma_callbacks.checkpoints.load_weights`). A single ``.safetensors`` file is read
here with ``safetensors`` (no pickle).

A path is read once, when the metric is built, and identified by its content: the label a
metric puts in its config (and so in the cache key) is the path *and* a fingerprint of the
tensors read, so a file rewritten in place under the same name never hits an old result.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from uma_callbacks.core.batches import fingerprint_batches

#: What a weights source may be: a path (checkpoint folder or ``.safetensors`` file), a
#: ``{name: tensor}`` mapping, or a model (its ``named_parameters``).
WeightsSource = str | os.PathLike | Mapping[str, torch.Tensor] | torch.nn.Module
FolderLoader = Callable[[Path], dict[str, torch.Tensor]]

_folder_loader: FolderLoader | None = None


def register_folder_loader(loader: FolderLoader) -> None:
    """Set the function that reads a checkpoint folder into ``{name: tensor}`` (CPU)."""
    global _folder_loader
    _folder_loader = loader


def load_weights_source(source: WeightsSource) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of a model, a mapping, a ``.safetensors`` file or a checkpoint folder.

    Raises:
        FileNotFoundError: the path has no weights.
        ValueError: a damaged weight file, or a source of another type.
        RuntimeError: a folder and no folder loader registered (``import uma_callbacks`` registers it).
    """  # noqa: DOC502 (FileNotFoundError: from the registered folder loader, checkpoints.load_weights)
    if isinstance(source, torch.nn.Module):
        return {n: p.detach() for n, p in source.named_parameters()}
    if isinstance(source, Mapping):
        return {str(k): v.detach() for k, v in source.items()}
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"weights must be a path, a model or a dict of tensors; got {type(source).__name__}")
    path = Path(source)
    if path.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path} is not a readable .safetensors file ({err})") from err
    if _folder_loader is None:
        raise RuntimeError("no checkpoint-folder loader is registered; `import uma_callbacks` registers it")
    return _folder_loader(path)


def weights_label(field: str, source: Any) -> tuple[str, dict[str, torch.Tensor]]:
    """``(label, weights)``: the weights of ``source`` and a label that identifies them by content.

    A path gives ``"<resolved path> @ weights:<fingerprint>"``; in-memory weights give
    ``"weights:<fingerprint>"`` (16 hex digits of sha256 over names, dtypes, shapes, bytes).

    Raises:
        ValueError: not a path, a dict of tensors or a module; a path that does not exist
            or holds no readable weights (the message names ``field``).
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ValueError(f"{field} must be an existing checkpoint folder or .safetensors file; got {str(source)!r}")
        try:
            weights = load_weights_source(path)
        except (FileNotFoundError, ValueError) as err:
            raise ValueError(f"{field}: no readable weights at {str(source)!r} ({err})") from err
        return f"{path.resolve()} @ weights:{fingerprint_batches([weights])[:16]}", weights
    if isinstance(source, torch.nn.Module):
        source = {n: p.detach() for n, p in source.named_parameters()}
    if isinstance(source, Mapping) and source and all(isinstance(v, torch.Tensor) for v in source.values()):
        weights = {str(k): v.detach() for k, v in source.items()}
        return "weights:" + fingerprint_batches([weights])[:16], weights
    raise ValueError(
        f"{field} must be a path (checkpoint folder or .safetensors file), a model or a dict of tensors; "
        f"got {type(source).__name__}"
    )

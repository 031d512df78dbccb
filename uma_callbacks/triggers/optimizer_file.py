"""A checkpoint's saved optimizer state (the Trainer's ``optimizer.pt``, Accelerate's ``optimizer.bin``), named after the model's parameters.

The file is ``optimizer.state_dict()`` saved by ``torch.save``: tensors and plain values,
read with ``torch.load(weights_only=True, mmap=True)`` (no pickle runs; the tensors stay on
disk until read). Its states are keyed by each parameter's index in ``param_groups``
order; the names come from the model, in the order the Trainer builds its groups (decay
parameters, then the rest: ``Trainer.create_optimizer``), else in the model's parameter
order, the first whose group sizes and shapes all agree
(:func:`~uma_callbacks.core.optimizer_state.from_state_dict`).

Nothing raises: a folder without the file gives a state standing for none (the metric's
skip record names why); an unreadable, oversized or mismatched file a failed one (the
metric's error record names the first mismatch).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from uma_callbacks.core.optimizer_state import OptimizerSnapshot, from_state_dict

#: The file names read, first found wins: the Trainer's, then Accelerate's first optimizer.
OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")
#: Bytes allowed per parameter entry: float64 exp_avg, exp_avg_sq and max_exp_avg_sq.
BYTES_PER_ENTRY = 3 * 8
#: Bytes allowed on top (step tensors, groups, the archive's own records).
SLACK_BYTES = 64 * 2**20


def read_optimizer_state(folder: str | os.PathLike[str], model: torch.nn.Module) -> OptimizerSnapshot:
    """The optimizer state saved in checkpoint ``folder``, by ``model``'s parameter names.

    Args:
        folder: the checkpoint folder.
        model: the model loaded from it (its parameter names and shapes).

    Returns:
        The :class:`~uma_callbacks.core.optimizer_state.OptimizerSnapshot`: named; standing for
        none (no file, with the reason); or failed (unreadable, too large, or not fitting the
        model, with the first mismatch).
    """
    root = Path(folder)
    found = [name for name in OPTIMIZER_FILES if (root / name).is_file()]
    if not found:
        extra = " (its optimizer_0/ folder, a sharded save, is not read)" if (root / "optimizer_0").is_dir() else ""
        return OptimizerSnapshot.unavailable(f"{root.name} holds no {' or '.join(OPTIMIZER_FILES)}{extra}", str(root))
    name = found[0]
    path = root / name
    source = f"{root.name}/{name}"
    if path.is_symlink() or Path(os.path.realpath(path)).parent != Path(os.path.realpath(root)):
        return OptimizerSnapshot.failed(f"{source} is a link or leaves the checkpoint folder; not read", source=source)
    n_entries = sum(p.numel() for p in model.parameters())
    limit = BYTES_PER_ENTRY * n_entries + SLACK_BYTES
    size = path.stat().st_size
    if size > limit:
        return OptimizerSnapshot.failed(
            f"{source} is {size} bytes, more than {limit} for the model's {n_entries} parameter entries; not read",
            source=source,
        )
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 (any unreadable file: a failed state, named; the backfill goes on)
        return OptimizerSnapshot.failed(
            f"{source} could not be read with weights_only=True: {type(err).__name__}: {err}", source=source
        )
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    try:
        return from_state_dict(state_dict, candidate_orders(model), shapes, source)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as err:  # a malformed structure inside
        return OptimizerSnapshot.failed(f"{source} is malformed: {type(err).__name__}: {err}", source=source)


def candidate_orders(model: torch.nn.Module) -> list[tuple[str, list[str], list[int] | None]]:
    """The parameter orders a saved state may follow, most likely first: ``[(label, names, group sizes)]``.

    1. ``"Trainer"``: the Trainer's groups, the parameters that take weight decay (its
       ``get_decay_parameter_names``) then the others, each in model order (group sizes given);
    2. ``"parameter"``: ``model.named_parameters()`` order, any grouping (Accelerate loops
       that pass ``model.parameters()``).

    Only trainable parameters count, as in the Trainer.
    """
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    orders: list[tuple[str, list[str], list[int] | None]] = []
    decay = _decay_names(model)
    if decay is not None:
        first = [n for n in trainable if n in decay]
        second = [n for n in trainable if n not in decay]
        orders.append(("Trainer", first + second, [len(first), len(second)]))
    orders.append(("parameter", trainable, None))
    return orders


def _decay_names(model: torch.nn.Module) -> set[str] | None:
    """The names the Trainer applies weight decay to (its own rule), or ``None`` without transformers."""
    try:
        from transformers import Trainer
    except ImportError:  # the Trainer's order cannot be rebuilt; the model's order is tried
        return None
    return set(Trainer.get_decay_parameter_names(None, model))  # type: ignore[arg-type] (uses no Trainer state)

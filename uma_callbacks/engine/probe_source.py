"""One builder for the probe, whatever a trigger was given.

Accepted sources, in the order they are tried:

- a :class:`~uma_callbacks.engine.probe.Probe` (used as is);
- a list of batches (dicts holding tensors with a batch dimension);
- a list of raw samples (dicts without tensors), or any map-style dataset: ``probe_size``
  samples drawn with ``seed`` and collated by ``collate_fn`` (the Trainer's own collator
  when the callback has it, else :func:`~uma_callbacks.engine.probe.pad_collate`);
- an iterable (an *unprepared* DataLoader): its first batches;
- nothing: the first of ``loaders`` (eval, then train) with a dataset; else the probe a
  run saved (``probe.safetensors`` in one of ``saved_roots``); else ``texts`` tokenised
  with ``tokenizer``.

No global RNG is consumed: every draw uses its own seeded generator.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from uma_callbacks.engine.journal import Journal
from uma_callbacks.engine.probe import Probe, load_probe, pad_collate


def _is_batch(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(isinstance(v, torch.Tensor) and v.dim() >= 1 for v in obj.values())


def check_probe_source(probe: Any, field: str = "probe") -> None:
    """Refuse, at construction, a probe source that cannot work.

    Raises:
        ValueError: empty, or of a type none of the builders takes (naming ``field``).
    """
    if probe is None or isinstance(probe, Probe):
        return
    if isinstance(probe, (list, tuple)):
        if len(probe) == 0:
            raise ValueError(f"{field} is empty; pass a dataset or batches with at least one sample")
        return
    if hasattr(probe, "__len__") and hasattr(probe, "__getitem__"):
        if len(probe) == 0:
            raise ValueError(f"{field} is an empty dataset; it must hold at least one sample")
        return
    if hasattr(probe, "__iter__"):
        return
    raise ValueError(
        f"{field} must be None, a Probe, a list of batches, a map-style dataset or a DataLoader; got {type(probe).__name__}"
    )


def build_probe(
    source: Any,
    *,
    probe_size: int,
    probe_batch_size: int,
    seed: int,
    collate_fn: Callable[[Sequence[Any]], Any] | None = None,
    loaders: Sequence[Any] = (),
    saved_roots: Sequence[Path] = (),
    texts: Sequence[str] | None = None,
    tokenizer: Any = None,
    max_length: int = 128,
    field: str = "probe",
) -> Probe:
    """The frozen probe for ``source`` (see the module docstring for what is accepted).

    Args:
        source: the user's probe argument.
        probe_size: samples drawn from a dataset.
        probe_batch_size: samples per probe batch.
        seed: picks the samples.
        collate_fn: turns a list of samples into a batch.
        loaders: dataloaders to draw from when ``source`` is None (first with a dataset wins).
        saved_roots: folders that may hold a saved ``probe.safetensors``.
        texts: raw texts (with ``tokenizer``) when nothing else is given.
        tokenizer: a tokenizer object (for ``texts``).
        max_length: tokens per text.
        field: the argument's name in error messages.

    Raises:
        ValueError: nothing to build a probe from (naming ``field``).
    """
    check_probe_source(source, field)
    collate = collate_fn or pad_collate
    if isinstance(source, Probe):
        return source
    if isinstance(source, (list, tuple)):
        if _is_batch(source[0]):
            return Probe(list(source))
        if not isinstance(source[0], Mapping):
            return Probe(list(source))  # custom batch objects: loss_fn understands them
        return Probe.from_dataset(list(source), probe_size, batch_size=probe_batch_size, seed=seed, collate_fn=collate)
    if source is not None and hasattr(source, "__len__") and hasattr(source, "__getitem__"):
        return Probe.from_dataset(source, probe_size, batch_size=probe_batch_size, seed=seed, collate_fn=collate)
    if source is not None:
        return Probe.from_dataloader(source, probe_size)
    for loader in loaders:
        dataset = getattr(loader, "dataset", None)
        if dataset is not None and hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
            loader_collate = getattr(loader, "collate_fn", None) or collate
            return Probe.from_dataset(dataset, probe_size, batch_size=probe_batch_size, seed=seed, collate_fn=loader_collate)
    for loader in loaders:
        if loader is not None:
            return Probe.from_dataloader(loader, probe_size)
    for root in saved_roots:
        try:
            return load_probe(root)
        except FileNotFoundError:
            continue
    if texts:
        if tokenizer is None:
            raise ValueError(f"{field}: texts were given without a tokenizer")
        chosen = list(texts)
        if len(chosen) > probe_size:
            index = np.sort(np.random.default_rng(seed).choice(len(chosen), size=probe_size, replace=False))
            chosen = [chosen[int(i)] for i in index]
        return Probe.from_texts(chosen, tokenizer, max_length=max_length, batch_size=probe_batch_size)
    where = ", ".join(os.fspath(r) for r in saved_roots) or "nowhere"
    raise ValueError(
        f"{field}: none given, no dataloader to draw it from, and no saved probe (probe.safetensors) in {where}; "
        "pass a dataset, batches or texts"
    )


def load_tokenizer(tokenizer: Any, folders: Sequence[Path]) -> Any:
    """A tokenizer object: ``tokenizer`` itself, its local folder, or the first checkpoint that has one.

    Raises:
        ValueError: none found.
    """
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from transformers import AutoTokenizer

    candidates = [Path(tokenizer)] if tokenizer is not None else list(folders)
    for folder in candidates:
        if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    raise ValueError(f"tokenizer: no tokenizer files in {[str(c) for c in candidates]}; pass tokenizer=FOLDER")


def check_probe_matches(probe: Probe, journals: Sequence[Journal]) -> None:
    """Refuse a probe whose fingerprint the journals' measured records do not carry.

    Raises:
        ValueError: the journals hold results on other probes only.
    """
    known: set[str] = set()
    for journal in journals:
        known |= {r.probe for r in journal.records() if r.probe and r.status in ("ok", "partial", "cached")}
    if known and probe.fingerprint not in known:
        raise ValueError(
            f"probe fingerprint {probe.fingerprint[:12]} differs from the journal's "
            f"({', '.join(sorted(k[:12] for k in known))}): the run was measured on other data. "
            "Rebuild it with the same data and seed (or from the saved probe.safetensors), "
            "or pass check_probe=False (CLI: --new-probe) to measure on a new probe anyway"
        )

"""The probe: a frozen, seeded set of batches, identical for every checkpoint.

Every checkpoint of a run is measured on the same samples, so that a change in a
metric is a change in the model, not in the data. A probe is built once (from a
``datasets.Dataset``, a ``DataLoader``, a list of batches, or texts with a tokenizer),
moved to CPU, and identified by a SHA-256 :attr:`Probe.fingerprint` over every tensor's
dtype, shape and bytes, so any changed token changes it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from uma_callbacks.core.batches import (  # noqa: F401 (re-exported)
    _first_tensor,
    count_samples,
    fingerprint_batches,
    map_tensors,
    move_batch,
    select_samples,
    split_batch,
)
from uma_callbacks.core.safe_json import read_json


def pad_collate(features: Sequence[Mapping[str, Any]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Collate tokenised samples, right-padded to the longest sample.

    ``input_ids`` are padded with the pad id, ``attention_mask`` with 0 and ``labels`` with
    -100. Other keys are stacked as tensors.
    """
    keys = list(features[0].keys())
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        values = [torch.as_tensor(f[key]) for f in features]
        if values[0].dim() == 0:
            out[key] = torch.stack(values)
            continue
        longest = max(v.shape[0] for v in values)
        fill = {"labels": -100, "attention_mask": 0, "input_ids": pad_token_id}.get(key, 0)
        padded = torch.full((len(values), longest, *values[0].shape[1:]), fill, dtype=values[0].dtype)
        for i, v in enumerate(values):
            padded[i, : v.shape[0]] = v
        out[key] = padded
    return out


class Probe:
    """Frozen batches on CPU, with a fingerprint.

    Args:
        batches: list of batches (dicts of tensors, leading batch dim).
        name: a label (e.g. the task), used by multi-probe metrics.

    Raises:
        ValueError: no batches, or a batch with no samples.

    Example:
        >>> p = Probe([{"x": torch.zeros(3, 2)}])
        >>> p.n_samples, len(p.fingerprint)
        (3, 64)
    """

    def __init__(self, batches: Sequence[Any], name: str = "probe") -> None:
        batches = [move_batch(b, "cpu") for b in batches]
        if not batches:
            raise ValueError("probe must hold at least one sample; got no batches")
        if any(count_samples(b) == 0 for b in batches):
            raise ValueError("probe batches must each hold at least one sample; got an empty batch")
        self.batches: list[Any] = batches
        self.name = name
        self.fingerprint: str = fingerprint_batches(batches)

    @property
    def n_samples(self) -> int:
        """Samples over all batches."""
        return sum(count_samples(b) for b in self.batches)

    def to(self, device: torch.device | str) -> list[Any]:
        """The batches on ``device`` (the probe itself stays on CPU)."""
        return [move_batch(b, device) for b in self.batches]

    def shard(self, rank: int, world_size: int) -> list[Any]:
        """Rank ``rank``'s samples: sample i goes to rank i % world_size (batches re-cut).

        The union over ranks is exactly the probe, whatever ``world_size``.
        """
        out = []
        offset = 0
        for batch in self.batches:
            n = count_samples(batch)
            mine = [i for i in range(n) if (offset + i) % world_size == rank]
            offset += n
            if mine:
                out.append(select_samples(batch, mine))
        return out

    def __repr__(self) -> str:
        return f"Probe(name={self.name!r}, n_samples={self.n_samples}, fingerprint={self.fingerprint[:12]})"

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_dataset(
        cls,
        dataset: Any,
        size: int,
        batch_size: int = 8,
        seed: int = 42,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        name: str = "probe",
    ) -> Probe:
        """``size`` samples drawn without replacement from a map-style dataset with ``seed``.

        Args:
            dataset: anything with ``__len__`` and ``__getitem__`` returning a dict
                (a ``datasets.Dataset``, a ``torch.utils.data.Dataset``, a list).
            size: samples in the probe (capped at ``len(dataset)``).
            batch_size: samples per probe batch.
            seed: picks the samples (``numpy.random.default_rng(seed)``).
            collate_fn: builds a batch from a list of samples; default :func:`pad_collate`.
            name: the probe's label.

        Raises:
            ValueError: ``size`` or ``batch_size`` not positive, or the dataset is empty.
        """
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"probe_size must be a positive integer; got {size!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"probe batch_size must be a positive integer; got {batch_size!r}")
        n = len(dataset)
        if n == 0:
            raise ValueError("probe dataset is empty; it must hold at least one sample")
        rng = np.random.default_rng(seed)
        index = np.sort(rng.choice(n, size=min(size, n), replace=False)).tolist()
        collate = collate_fn or pad_collate
        samples = [_strip_text_columns(dataset[int(i)]) for i in index]
        batches = [collate(samples[s : s + batch_size]) for s in range(0, len(samples), batch_size)]
        return cls(batches, name=name)

    @classmethod
    def from_dataloader(cls, dataloader: Iterable[Any], size: int, name: str = "probe") -> Probe:
        """The first batches of a dataloader, cut to exactly ``size`` samples.

        Raises:
            ValueError: ``size`` not positive or the dataloader yields nothing.
        """
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"probe_size must be a positive integer; got {size!r}")
        batches, taken = [], 0
        for batch in dataloader:
            batch = move_batch(batch, "cpu")
            n = count_samples(batch)
            if taken + n > size:
                batch = select_samples(batch, list(range(size - taken)))
                n = size - taken
            batches.append(batch)
            taken += n
            if taken >= size:
                break
        if not batches:
            raise ValueError("probe dataloader yielded no batches; the probe needs samples")
        return cls(batches, name=name)

    @classmethod
    def from_texts(
        cls,
        texts: Sequence[str],
        tokenizer: Any,
        max_length: int = 128,
        batch_size: int = 8,
        name: str = "probe",
    ) -> Probe:
        """Tokenise ``texts`` for causal LM: ``labels`` = ``input_ids`` with padding set to -100.

        Raises:
            ValueError: no texts.
        """
        if not texts:
            raise ValueError("probe texts must hold at least one text; got none")
        batches = []
        for s in range(0, len(texts), batch_size):
            enc = tokenizer(
                list(texts[s : s + batch_size]),
                truncation=True,
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            )
            labels = enc["input_ids"].clone()
            labels[enc["attention_mask"] == 0] = -100
            batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
        return cls(batches, name=name)


def _strip_text_columns(sample: Any) -> Any:
    if isinstance(sample, Mapping):
        return {k: v for k, v in sample.items() if not isinstance(v, str)}
    return sample


# ---------------------------------------------------------------------- on disk
#: File names of a saved probe, next to the journal (``<output_dir>/uma/``).
PROBE_TENSORS = "probe.safetensors"
PROBE_META = "probe.json"


def save_probe(probe: Probe, root: str | Any) -> None:
    """Write ``probe`` as ``<root>/probe.safetensors`` + ``<root>/probe.json`` (no pickle).

    The offline backfill (``uma backfill RUN_DIR``) rebuilds the very same probe from
    these two files; ``probe.json`` holds the fingerprint, which :func:`load_probe`
    checks. Only batches that are flat dicts of tensors can be saved.

    Args:
        probe: the frozen probe.
        root: the folder (usually the journal root, ``<output_dir>/uma``; created).

    Raises:
        ValueError: a batch is not a flat ``{str: Tensor}`` dict.
    """
    import os
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(root)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    layout: list[list[str]] = []
    for i, batch in enumerate(probe.batches):
        if not isinstance(batch, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in batch.items()
        ):
            raise ValueError(
                f"save_probe: batch {i} must be a flat dict of tensors to be saved; got {type(batch).__name__}"
            )
        layout.append(list(batch.keys()))
        for key, value in batch.items():
            # a copy each: safetensors refuses tensors sharing memory (labels = input_ids)
            tensors[f"{i}/{key}"] = value.detach().to("cpu", copy=True).contiguous()
    meta = {"fingerprint": probe.fingerprint, "name": probe.name, "n_samples": probe.n_samples, "layout": layout}
    tmp = folder / (PROBE_TENSORS + ".tmp")
    save_file(tensors, str(tmp), metadata={"fingerprint": probe.fingerprint})
    os.replace(tmp, folder / PROBE_TENSORS)
    tmp_meta = folder / (PROBE_META + ".tmp")
    tmp_meta.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    os.replace(tmp_meta, folder / PROBE_META)


def load_probe(root: str | Any) -> Probe:
    """The probe :func:`save_probe` wrote under ``root``, fingerprint checked.

    Args:
        root: the folder holding ``probe.safetensors`` and ``probe.json``.

    Returns:
        The probe, with the same batches, keys order and fingerprint.

    Raises:
        FileNotFoundError: no saved probe under ``root``.
        ValueError: a file is damaged, of another shape, or disagrees with the recorded
            fingerprint (damaged or edited); never another error for what the files hold.
    """
    from pathlib import Path

    from safetensors.torch import load_file

    folder = Path(root)
    if not (folder / PROBE_TENSORS).is_file() or not (folder / PROBE_META).is_file():
        raise FileNotFoundError(f"no saved probe ({PROBE_TENSORS} + {PROBE_META}) in {folder}")
    meta = read_json(folder / PROBE_META)  # UnreadableJSON (a ValueError): too deep, too long, not JSON
    layout = meta.get("layout") if isinstance(meta, dict) else None
    name = meta.get("name", "probe") if isinstance(meta, dict) else None
    if not (
        isinstance(layout, list)
        and layout
        and all(isinstance(keys, list) and keys and all(isinstance(k, str) for k in keys) for keys in layout)
        and isinstance(name, str)
    ):
        raise ValueError(
            f"{PROBE_META} in {folder} must be an object with 'layout' (a list of lists of key names) and "
            f"'name' (a string); the file is damaged or was edited"
        )
    try:
        tensors = load_file(str(folder / PROBE_TENSORS))
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise ValueError(f"saved probe {folder / PROBE_TENSORS} is unreadable ({type(err).__name__}: {err})") from err
    missing = [f"{i}/{key}" for i, keys in enumerate(layout) for key in keys if f"{i}/{key}" not in tensors]
    if missing:
        raise ValueError(f"saved probe in {folder}: {PROBE_META} names tensors {missing[:3]} the file does not hold")
    batches = [{key: tensors[f"{i}/{key}"] for key in keys} for i, keys in enumerate(layout)]
    try:
        probe = Probe(batches, name=name)
    except (TypeError, IndexError, RuntimeError) as err:  # tensors of odd shapes
        raise ValueError(f"saved probe in {folder} is not a probe ({type(err).__name__}: {err})") from err
    if probe.fingerprint != meta.get("fingerprint"):
        raise ValueError(
            f"saved probe in {folder} has fingerprint {probe.fingerprint[:12]} but probe.json records "
            f"{str(meta.get('fingerprint'))[:12]}: the files are damaged or were edited"
        )
    return probe

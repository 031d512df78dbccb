r"""Sharded checkpoints written by ``torch.distributed.checkpoint`` (DCP), read into full tensors.

Under FSDP, Accelerate's ``save_state`` and the Trainer with ``fsdp_config={"state_dict_type":
"SHARDED_STATE_DICT"}`` write the model as a DCP folder, ``<checkpoint>/pytorch_model_fsdp_0/``
(``accelerate.utils.constants.FSDP_MODEL_NAME`` + ``_<model index>``), holding

- ``.metadata``: a **pickle** of ``torch.distributed.checkpoint.metadata.Metadata``: for each
  flattened key (``model.<parameter name>``, since Accelerate saves ``{"model": state_dict}``)
  the full size, dtype and chunks ``(offsets, sizes)`` of the tensor, and for each chunk a
  ``_StorageInfo(relative_path, offset, length)`` naming a byte range of one data file;
- ``__<rank>_<i>.distcp``: the data files; each chunk is one ``torch.save`` of the chunk's
  tensor at ``[offset, offset + length)``.

The optimizer goes to a separate folder (``optimizer_0/``), never read here.

Nothing read from disk is trusted, and nothing is unpickled with the full unpickler:

- ``.metadata`` is read by :class:`_MetadataUnpickler`, which resolves only the globals of
  :data:`ALLOWED_GLOBALS` (the DCP metadata dataclasses, ``torch.Size``, torch dtypes,
  layouts and memory formats, ``collections.OrderedDict``, ``pathlib`` paths): any other
  global (``os.system``, ``builtins.eval``, ...) makes :func:`read_metadata` raise
  ``ValueError`` naming the file before anything is called. The set was found by tracing
  the globals that ``pickle`` asks for while loading real checkpoints (``dcp.save`` in one
  process, and Accelerate's ``save_fsdp_model`` under ``torchrun`` with ``fully_shard``).
- The unpickled object is then checked field by field (:func:`plan_dcp`): types, sizes,
  chunks inside their tensor and covering it exactly once, data file names that are plain
  names of regular files inside the DCP folder, byte ranges inside each file and at least as
  long as the data their chunk claims (so no size read from disk can make the loader allocate
  more than the files hold), no stream transforms. Any violation is a ``ValueError`` naming the folder and what is wrong.
- Each chunk is read as ``torch.load(bytes, weights_only=True)`` (PyTorch's restricted
  unpickler, as ``FileSystemReader.read_data`` does) and must be a tensor of the chunk's
  size and dtype. Non-tensor entries (``BytesStorageMetadata``) would need a full unpickle
  (``DefaultLoadPlanner.load_bytes`` uses ``weights_only=False``): they are never read, only
  named in the result's meta.

Gathering: the full model is ``sum_t numel(t) * itemsize(t)`` bytes (from the metadata,
before anything is read). With ``max_bytes`` set and exceeded, :func:`load_dcp` raises
:class:`GatherExceedsBudget` and reads nothing. Names: when the metadata's ``planner_data``
maps every tensor under one top-level ``"model"`` entry (Accelerate and the Trainer do), the
names are the keys inside it (``model.model.embed_tokens.weight`` -> ``model.embed_tokens.weight``);
other top-level entries are left out. Otherwise the flattened keys are the names.

Example:
    >>> import tempfile, torch
    >>> import torch.distributed.checkpoint as dcp
    >>> folder = tempfile.mkdtemp()
    >>> dcp.save({"model": {"w": torch.arange(6.0).reshape(2, 3)}}, checkpoint_id=folder)  # doctest: +ELLIPSIS
    Metadata(...)
    >>> weights, meta = load_dcp(folder)
    >>> weights["w"].tolist(), meta["gathered_bytes"]
    ([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]], 24)
"""

from __future__ import annotations

import io
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from uma_callbacks.core.file_names import is_plain_file_name
from uma_callbacks.core.tiling import tiling_fault

#: DCP's metadata file name (``torch.distributed.checkpoint.filesystem._metadata_fn``).
METADATA_FILE = ".metadata"
#: The model folder Accelerate's ``save_fsdp_model`` writes for the first model
#: (``f"{FSDP_MODEL_NAME}_{model_index}"``); the Trainer calls the same function.
ACCELERATE_MODEL_FOLDER = "pytorch_model_fsdp_0"

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_DCP_FILESYSTEM = "torch.distributed.checkpoint.filesystem"

#: ``(module, name)`` of every global the metadata unpickler resolves; nothing else.
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        (_DCP_METADATA, "Metadata"),
        (_DCP_METADATA, "TensorStorageMetadata"),
        (_DCP_METADATA, "BytesStorageMetadata"),
        (_DCP_METADATA, "ChunkStorageMetadata"),
        (_DCP_METADATA, "TensorProperties"),
        (_DCP_METADATA, "MetadataIndex"),
        (_DCP_METADATA, "StorageMeta"),
        (_DCP_METADATA, "_MEM_FORMAT_ENCODING"),
        (_DCP_FILESYSTEM, "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "PureWindowsPath"),
    }
    | {
        ("torch", n)
        for n in dir(torch)
        if isinstance(getattr(torch, n, None), (torch.dtype, torch.layout, torch.memory_format))
    }
)


class GatherExceedsBudget(RuntimeError):
    """Gathering a sharded checkpoint into full tensors would exceed the memory budget."""


@dataclass(frozen=True)
class _Piece:
    """One chunk of a tensor: where it sits in the full tensor and where its bytes are."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    start: int
    length: int


@dataclass(frozen=True)
class _TensorPlan:
    """A full tensor to assemble: its DCP key, model name, dtype, size and chunks."""

    key: str
    name: str
    dtype: torch.dtype
    size: tuple[int, ...]
    pieces: tuple[_Piece, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.size) * _itemsize(self.dtype)


@dataclass(frozen=True)
class DcpPlan:
    """What a DCP model folder holds, validated (see :func:`plan_dcp`).

    Attributes:
        folder: the DCP folder.
        tensors: the full tensors to assemble, in metadata order.
        files: the data files the chunks live in (plain names inside ``folder``).
        ignored: keys left out (non-tensor entries; entries outside the ``"model"`` subtree).
    """

    folder: Path
    tensors: tuple[_TensorPlan, ...]
    files: tuple[str, ...]
    ignored: tuple[str, ...]

    @property
    def total_bytes(self) -> int:
        """Bytes of the full (gathered) tensors."""
        return sum(t.nbytes for t in self.tensors)


# ---------------------------------------------------------------------- discovery
def is_dcp_folder(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` holds a DCP ``.metadata`` file."""
    return (Path(folder) / METADATA_FILE).is_file()


def find_dcp_model_folder(checkpoint: str | os.PathLike[str]) -> Path | None:
    """The DCP model folder of a checkpoint folder, or None.

    ``<checkpoint>/pytorch_model_fsdp_0/`` (Accelerate's ``save_state`` and the Trainer under
    FSDP with a sharded state dict), else ``checkpoint`` itself when it is a DCP folder.
    ``optimizer_0/`` is never returned.
    """
    checkpoint = Path(checkpoint)
    nested = checkpoint / ACCELERATE_MODEL_FOLDER
    if is_dcp_folder(nested):
        return nested
    return checkpoint if is_dcp_folder(checkpoint) else None


# ---------------------------------------------------------------------- metadata
class _MetadataUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS` and no persistent ids."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not a DCP metadata type; refused")
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not part of DCP metadata; refused")


def read_metadata(folder: str | os.PathLike[str]) -> Any:
    """The ``Metadata`` object of a DCP folder, unpickled with the allow-list only.

    Raises:
        FileNotFoundError: no ``.metadata`` in ``folder``.
        ValueError: the file names a global outside :data:`ALLOWED_GLOBALS`, is damaged, or
            does not hold a ``Metadata`` object (the message names the file).
    """
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no DCP metadata file {path}")
    try:
        with open(path, "rb") as fh:
            metadata = _MetadataUnpickler(fh).load()
    except Exception as err:  # any unpickling failure is a refusal of this file, reported with its reason
        raise ValueError(f"DCP metadata {path} refused: {type(err).__name__}: {err}") from err
    if not isinstance(metadata, Metadata):
        raise ValueError(f"DCP metadata {path} refused: it holds a {type(metadata).__name__}, not a Metadata")
    return metadata


def plan_dcp(folder: str | os.PathLike[str]) -> DcpPlan:
    """Read and validate a DCP folder's metadata into a :class:`DcpPlan` (no tensor is read).

    Raises:
        FileNotFoundError: no ``.metadata``.
        ValueError: refused metadata (see :func:`read_metadata`), or a field that is not
            what DCP writes: a chunk outside its tensor, chunks that do not cover it exactly
            once, a data file outside the folder or missing, a byte range outside its file,
            stream transforms, two tensors with one name, no tensor at all.
    """  # noqa: DOC502 (FileNotFoundError: from read_metadata)
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    folder = Path(folder)
    metadata = read_metadata(folder)
    where = f"DCP metadata {folder / METADATA_FILE}"
    entries, storage = metadata.state_dict_metadata, metadata.storage_data
    if not isinstance(entries, dict) or not all(isinstance(k, str) for k in entries):
        raise ValueError(f"{where}: state_dict_metadata must map names to entries")
    if not isinstance(storage, dict) or not all(
        isinstance(k, MetadataIndex) and isinstance(v, _StorageInfo) for k, v in storage.items()
    ):
        raise ValueError(f"{where}: storage_data must map MetadataIndex to _StorageInfo")
    locations = {  # tensor chunks only (a non-tensor entry's index has no offset)
        (k.fqn, _ints(k.offset, where, "storage offset")): v
        for k, v in storage.items()
        if k.offset is not None
    }
    names, ignored = _model_names(entries, metadata.planner_data, where)
    root = folder.resolve()
    file_sizes: dict[str, int] = {}
    tensors: list[_TensorPlan] = []
    for key, entry in entries.items():
        if key not in names:
            continue
        if isinstance(entry, BytesStorageMetadata):
            ignored.append(key)
            continue
        if not isinstance(entry, TensorStorageMetadata) or not isinstance(entry.properties, TensorProperties):
            raise ValueError(f"{where}: entry {key!r} is a {type(entry).__name__}, not tensor metadata")
        dtype = entry.properties.dtype
        if not isinstance(dtype, torch.dtype) or not isinstance(entry.chunks, list):
            raise ValueError(f"{where}: entry {key!r} has no torch dtype or no chunk list")
        size = _ints(entry.size, where, f"size of {key!r}")
        pieces = []
        itemsize = _itemsize(dtype)
        for chunk in entry.chunks:
            offsets = _ints(getattr(chunk, "offsets", None), where, f"chunk offsets of {key!r}")
            sizes = _ints(getattr(chunk, "sizes", None), where, f"chunk sizes of {key!r}")
            if (
                len(offsets) != len(size)
                or len(sizes) != len(size)
                or any(o + s > n for o, s, n in zip(offsets, sizes, size))
            ):
                raise ValueError(
                    f"{where}: a chunk of {key!r} (offsets {offsets}, sizes {sizes}) lies outside its size {size}"
                )
            info = locations.get((key, offsets))
            if info is None:
                raise ValueError(f"{where}: the chunk of {key!r} at {offsets} has no storage entry")
            piece = _Piece(offsets, sizes, *_byte_range(info, root, file_sizes, where, key))
            if math.prod(sizes) * itemsize > piece.length:  # a size no data on disk can back
                raise ValueError(
                    f"{where}: the chunk of {key!r} at {offsets} claims {math.prod(sizes) * itemsize} bytes "
                    f"of {dtype} data but its byte range holds only {piece.length}"
                )
            pieces.append(piece)
        _check_cover(key, size, pieces, where)
        tensors.append(_TensorPlan(key, names[key], dtype, size, tuple(pieces)))
    seen: dict[str, str] = {}
    for t in tensors:
        if t.name in seen:
            raise ValueError(f"{where}: {seen[t.name]!r} and {t.key!r} both name the weight {t.name!r}")
        seen[t.name] = t.key
    if not tensors:
        raise ValueError(f"{where}: no model tensors in the checkpoint (entries: {sorted(entries)[:5]})")
    files = tuple(sorted({p.file for t in tensors for p in t.pieces}))
    return DcpPlan(folder, tuple(tensors), files, tuple(sorted(ignored)))


def _ints(value: Any, where: str, what: str) -> tuple[int, ...]:
    """``value`` as a tuple of non-negative ints (a ``torch.Size`` or a tuple/list of ints).

    Raises:
        ValueError: anything else (``where`` and ``what`` name the field).
    """
    if not isinstance(value, (tuple, list)) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**62 for v in value
    ):
        raise ValueError(f"{where}: the {what} must be a tuple of non-negative integers; got {value!r:.80}")
    return tuple(int(v) for v in value)


def _model_names(entries: dict[str, Any], planner_data: Any, where: str) -> tuple[dict[str, str], list[str]]:
    """``({key: model name}, [keys left out])`` from the flattening map DCP saves.

    Keys under a top-level ``"model"`` entry (``("model", "<param>")``) become ``<param>``
    and every other top-level entry is left out; without such entries, keys are names.
    """
    paths: dict[str, tuple[Any, ...]] = {}
    if isinstance(planner_data, dict):
        for key, path in planner_data.items():
            if (
                isinstance(key, str)
                and isinstance(path, (tuple, list))
                and path
                and all(isinstance(p, (str, int)) and not isinstance(p, bool) for p in path)
            ):
                paths[key] = tuple(path)
    nested = {k for k in entries if len(paths.get(k, ())) >= 2 and paths[k][0] == "model"}
    if not nested:
        return {k: k for k in entries}, []
    names = {k: ".".join(str(p) for p in paths[k][1:]) for k in nested}
    return names, sorted(set(entries) - nested)


def _byte_range(
    info: Any, root: Path, file_sizes: dict[str, int], where: str, key: str
) -> tuple[str, int, int]:
    """``(file name, start, length)`` of one chunk, checked against the folder and the file.

    Raises:
        ValueError: a data file outside the folder or missing, stream transforms, or a byte
            range that is not integer or lies outside its file.
    """
    name, start, length = info.relative_path, info.offset, info.length
    if not (isinstance(name, str) and name in file_sizes) and not is_plain_file_name(name):  # known names were checked
        raise ValueError(
            f"{where}: the chunk of {key!r} names the data file {name!r:.80} outside its checkpoint folder; refused"
        )
    if getattr(info, "transform_descriptors", None):
        raise ValueError(
            f"{where}: the chunk of {key!r} uses stream transforms {info.transform_descriptors!r:.80}; not supported"
        )
    if name not in file_sizes:
        path = (root / name).resolve()
        if path.parent != root or not path.is_file():
            raise ValueError(
                f"{where}: the data file {name!r} of {key!r} is missing or lies outside its checkpoint folder"
            )
        file_sizes[name] = path.stat().st_size
    for value in (start, length):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(
                f"{where}: the byte range of {key!r} in {name} is not integer ({start!r}, {length!r})"
            )
    if start < 0 or length <= 0 or start + length > file_sizes[name]:
        raise ValueError(
            f"{where}: the chunk of {key!r} claims bytes [{start}, {start + length}) of {name}, "
            f"which holds {file_sizes[name]} bytes (truncated or damaged)"
        )
    return name, int(start), int(length)


def _check_cover(key: str, size: tuple[int, ...], pieces: list[_Piece], where: str) -> None:
    """Check that the chunks tile the tensor: each entry in exactly one chunk (one sort, :mod:`~uma_callbacks.core.tiling`).

    Raises:
        ValueError: the chunks do not tile it, or the check would be too large (the reason from
            :func:`~uma_callbacks.core.tiling.tiling_fault`).
    """
    fault = tiling_fault(size, [(p.offsets, p.sizes) for p in pieces], what=f"chunks of {key!r}")
    if fault is not None:
        raise ValueError(f"{where}: {fault}")


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------------- loading
def load_dcp(
    folder: str | os.PathLike[str], max_bytes: int | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Gather a DCP model folder into full CPU tensors, in one process.

    Args:
        folder: the DCP folder (``.metadata`` + ``*.distcp``).
        max_bytes: the memory the gathered tensors may take (``None``: no check). Checked
            against the metadata's total before any data is read.

    Returns:
        ``(weights, meta)``: ``{name: tensor}`` with each tensor's saved dtype, and
        ``{"format": "dcp", "dcp_folder", "shards" (data files read), "tensors",
        "gathered_bytes", "ignored_entries"}``.

    Raises:
        FileNotFoundError: no ``.metadata``.
        ValueError: refused or inconsistent metadata (:func:`plan_dcp`), or a chunk that
            cannot be read (truncated, damaged, not a tensor of its size and dtype).
        GatherExceedsBudget: the full tensors need more than ``max_bytes``.
    """  # noqa: DOC502 (FileNotFoundError and ValueError: from plan_dcp and _read_chunk)
    plan = plan_dcp(folder)
    total = plan.total_bytes
    if max_bytes is not None and total > max_bytes:
        raise GatherExceedsBudget(
            f"gathering the sharded checkpoint {plan.folder} ({len(plan.files)} shard file(s)) into full tensors "
            f"needs {total / 2**20:.2f} MiB, above the memory budget of {max_bytes / 2**20:.2f} MiB; raise "
            "memory_budget= or merge the shards first (`accelerate merge-weights`); nothing was read"
        )
    weights = {t.name: torch.empty(t.size, dtype=t.dtype) for t in plan.tensors}
    by_file: dict[str, list[tuple[_TensorPlan, _Piece]]] = {}
    for t in plan.tensors:
        for piece in t.pieces:
            by_file.setdefault(piece.file, []).append((t, piece))
    for name, items in by_file.items():
        with open(plan.folder / name, "rb") as fh:
            for t, piece in sorted(items, key=lambda item: item[1].start):
                chunk = _read_chunk(fh, plan.folder / name, t, piece)
                target = weights[t.name]
                for dim, (start, length) in enumerate(zip(piece.offsets, piece.sizes)):
                    target = target.narrow(dim, start, length)
                target.copy_(chunk)
    meta = {
        "format": "dcp",
        "dcp_folder": str(plan.folder),
        "shards": len(plan.files),
        "tensors": len(plan.tensors),
        "gathered_bytes": total,
        "ignored_entries": list(plan.ignored),
    }
    return weights, meta


def _read_chunk(fh: Any, path: Path, t: _TensorPlan, piece: _Piece) -> torch.Tensor:
    """One chunk: ``torch.load(weights_only=True)`` of its byte range, checked against the plan.

    Raises:
        ValueError: the range is cut short, cannot be loaded, or holds anything but a tensor of
            the planned shape and dtype.
    """
    fh.seek(piece.start)
    data = fh.read(piece.length)
    where = f"the chunk of {t.key!r} at {piece.offsets} in {path} (bytes {piece.start}+{piece.length})"
    if len(data) != piece.length:
        raise ValueError(f"{where} is cut short: {len(data)} bytes read (the file changed while reading?)")
    try:
        chunk = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises several types for damaged or forged archives
        raise ValueError(f"{where} cannot be read: {type(err).__name__}: {err}") from err
    if not isinstance(chunk, torch.Tensor):
        raise ValueError(f"{where} holds a {type(chunk).__name__}, not a tensor")
    if tuple(chunk.shape) != piece.sizes or chunk.dtype != t.dtype:
        raise ValueError(
            f"{where} holds a {tuple(chunk.shape)} {chunk.dtype} tensor; the metadata says {piece.sizes} {t.dtype}"
        )
    return chunk


__all__ = [
    "ACCELERATE_MODEL_FOLDER",
    "ALLOWED_GLOBALS",
    "METADATA_FILE",
    "DcpPlan",
    "GatherExceedsBudget",
    "find_dcp_model_folder",
    "is_dcp_folder",
    "load_dcp",
    "plan_dcp",
    "read_metadata",
]

"""Read a W&B ``.wandb`` run file back (wandb 0.31 ships no reader).

The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0),
then 32 KiB blocks of chunks, each with a 7-byte header (crc32 ``<I``, length ``<H``,
type ``B``: 1 full, 2 first, 3 middle, 4 last); a block's tail shorter than a chunk
header is zero padding. Each reassembled payload is one ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list[Any]:
    """Every protobuf ``Record`` in a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:_HEADER])
    assert ident == b":W&B" and magic == 0xBEE1 and version == 0, (ident, magic, version)
    records, pending, pos = [], b"", _HEADER
    while pos + _HEADER <= len(data):
        left_in_block = _BLOCK - (pos % _BLOCK)
        if left_in_block < _HEADER:
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if kind == 0 and length == 0:  # padding / unwritten tail
            pos += left_in_block
            continue
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            pending = chunk
        elif kind == _FIRST:
            pending = chunk
            continue
        elif kind == _MIDDLE:
            pending += chunk
            continue
        elif kind == _LAST:
            pending += chunk
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        records.append(record)
        pending = b""
    return records


def run_file(wandb_dir: str | Path) -> Path:
    """The single ``.wandb`` file of the single offline run under ``wandb_dir``."""
    files = sorted(Path(wandb_dir).glob("**/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    return files[0]


def history_rows(records: list[Any]) -> list[dict[str, Any]]:
    """The history rows, each ``{key: decoded JSON value}``."""
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


def metric_definitions(records: list[Any]) -> list[Any]:
    """The ``define_metric`` records."""
    return [r.metric for r in records if r.WhichOneof("record_type") == "metric"]


def artifacts(records: list[Any]) -> list[Any]:
    """The artifact records."""
    return [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]


def settled_records(folder, complete, seconds: float = 15.0, quiet: float = 0.5):
    """The run file's records once ``complete(history rows)`` holds and the file has not grown
    for ``quiet`` seconds: W&B's service process may still be writing the file's tail for a
    moment after ``finish()`` returns (seen in offline mode on a loaded machine), and rows a
    condition counts may come before the rest of a record's delivery (a live training's
    values go out at the save, its figures and files once they are drawn)."""
    import time

    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + seconds
    while True:
        path = run_file(folder)
        size = path.stat().st_size
        try:
            records = read_records(path)
        except DecodeError:  # the tail is being written right now: read again
            if time.monotonic() > deadline:
                raise
            records = None
        if records is not None and time.monotonic() > deadline:
            return records
        if records is not None and complete(history_rows(records)):
            time.sleep(quiet)
            if path.stat().st_size == size:
                return records
            continue
        time.sleep(0.2)

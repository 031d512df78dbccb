"""Figure notes: the files drawn after a record was journalled (``figures.jsonl``).

A live training journals a record at its save, before its figures exist (they are drawn
off the training path, :mod:`~uma_callbacks.engine.late_figures`). When they are written,
one self-checking line in ``figures.jsonl`` (beside ``journal.jsonl``) names them::

    {"id": <the record's record_id>, "files": ["step-40/gradient_flow-layers.png"],
     "file_ids": {"step-40/gradient_flow-layers.png": {"size": ..., "sha256": ...}},
     "missing_files": {<a figure that could not be written>: <why>}}

:class:`~uma_callbacks.engine.journal.Journal` reads the notes with the records and adds
each note's files to the record with that id (:func:`apply_note`), so every reader (the
sinks, ``uma sync``, ``uma report``) sees the record with its figures. The journal line
itself is never rewritten.

A note is data from disk: :func:`check_note` refuses anything but that shape, and
:func:`apply_note` adds only PNG files inside the record's own step folder (uploads check
each file against its ``file_ids`` entry as for any record file).
"""

from __future__ import annotations

import re
from typing import Any

from uma_callbacks.core.records import SCHEMA, Record

#: The notes' file, beside the journal.
FIGURES_FILE = "figures.jsonl"
#: The most files one note may name.
MAX_NOTE_FILES = 1000
_ID = re.compile(r"[0-9a-f]{24}")


def make_note(record: Record, files: list[str], missing: dict[str, str]) -> dict[str, Any]:
    """The note naming ``files`` (written, in ``record.file_ids``) and ``missing`` (``{path: why}``) of ``record``."""
    return {
        "id": record.record_id,
        "files": list(files),
        "file_ids": {rel: record.file_ids[rel] for rel in files if rel in record.file_ids},
        "missing_files": dict(missing),
    }


def check_note(payload: Any) -> dict[str, Any] | None:
    """``payload`` when it has a note's shape, else ``None``."""
    if not isinstance(payload, dict) or not isinstance(payload.get("id"), str) or not _ID.fullmatch(payload["id"]):
        return None
    files, ids, missing = payload.get("files"), payload.get("file_ids", {}), payload.get("missing_files", {})
    if not (isinstance(files, list) and len(files) <= MAX_NOTE_FILES and all(isinstance(f, str) for f in files)):
        return None
    if not SCHEMA["file_ids"][1](ids):  # each {"size", "sha256"}, as in a record
        return None
    if not (isinstance(missing, dict) and len(missing) <= MAX_NOTE_FILES):
        return None
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in missing.items()):
        return None
    return payload


def apply_note(record: Record, note: dict[str, Any]) -> None:
    """Add ``note``'s figures to ``record``: its files (with their ``file_ids``) and what could not be written.

    Only ``step-<record.step>/...png`` paths without ``..`` are taken; a file named
    already is not named twice.
    """
    for rel in note["files"]:
        if not _own_figure(record, rel):
            continue
        ident = note["file_ids"].get(rel)
        if ident is None:
            continue
        if rel not in record.files:
            record.files.append(rel)
        record.file_ids[rel] = ident
        record.missing_files.pop(rel, None)
    for rel, why in note["missing_files"].items():
        if _own_figure(record, rel) and rel not in record.files:
            record.missing_files[rel] = why[:300]


def _own_figure(record: Record, rel: str) -> bool:
    parts = rel.split("/")
    return (
        rel.startswith(f"step-{int(record.step)}/")
        and rel.endswith(".png")
        and len(parts) <= 3
        and not any(p in ("", ".", "..") for p in parts)
    )

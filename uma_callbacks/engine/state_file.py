"""``uma_state.json``: what a measured ``save_state`` folder records about itself.

The Accelerate hook writes it into every folder ``accelerator.save_state()`` fills; the
backfill reads the folder's global step from it (Accelerate's own counters count saves,
not optimizer steps).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from uma_callbacks.core.records import Record
from uma_callbacks.core.safe_json import read_json

#: The file's name (one name for it everywhere; ``checkpoints.UMA_STATE`` reads it).
STATE_FILE = "uma_state.json"
#: Version tag of the file's layout.
STATE_FORMAT = "uma-state/1"


def write_state(
    folder: str | os.PathLike[str], step: int, journal_root: Path, probe_fingerprint: str, records: Sequence[Record]
) -> Path:
    """Write :data:`STATE_FILE` into a ``save_state`` folder (atomically).

    Layout: ``{"format", "step", "journal", "probe_fingerprint", "records": [{"metric",
    "status", "record_id"}]}``; ``step`` is the global step the folder was saved at.

    Returns:
        The file's path.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": STATE_FORMAT,
        "step": int(step),
        "journal": str(Path(journal_root).resolve()),
        "probe_fingerprint": probe_fingerprint,
        "records": [{"metric": r.metric, "status": r.status, "record_id": r.record_id} for r in records],
    }
    path = folder / STATE_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_state(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The :data:`STATE_FILE` of a ``save_state`` folder, or ``None`` when absent.

    Raises:
        ValueError: the file is not bounded, strict JSON (:mod:`~uma_callbacks.core.safe_json`).
        OSError: the file exists but cannot be read.
    """  # noqa: DOC502 (from read_json)
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        return None
    return read_json(path)  # bounded (core/safe_json): a ValueError for whatever the file holds

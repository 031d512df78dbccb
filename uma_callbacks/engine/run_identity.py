"""Which training run a record belongs to.

Every record carries ``run``: the id of the training run that made it (32 hex digits, drawn
when a fresh training starts). A second training in the same ``output_dir`` draws its own
id, so it never receives the first one's records; a training resumed from a checkpoint
keeps the id of the run that saved that checkpoint, and so continues its tracker run.

Where a run's id is kept, so that a resume finds it again:

- every record's ``run`` field in ``journal.jsonl`` (stamped by :class:`RunJournal`);
- :data:`RUN_FILE` (``uma_run.json``: ``{"format", "run", "step"}``) in every checkpoint
  folder the Trainer saves, written before that save is measured (a ``kill -9`` during the
  measurement leaves it there);
- the tracker: the ``uma.run`` param, and in ``deliveries.jsonl`` the (sink, run, uri) each
  of the run's records went to (:func:`tracker_run`).

Records written before the field existed read back with ``run == ""``: together they are one
run of their own (an older version's journal holds one training run, or at least never told
them apart). A fresh training never replays them; ``uma sync`` delivers them only to a tracker
run that already holds some of them, or when they are the journal's newest run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from uma_callbacks.core.records import Record
from uma_callbacks.engine.journal import DELIVERIES_FILE, Journal, read_lines

logger = logging.getLogger(__name__)

#: The marker a checkpoint folder holds: which run saved it, at which step.
RUN_FILE = "uma_run.json"
#: Version tag of the marker's layout.
RUN_FORMAT = "uma-run/1"
#: What a run id looks like (records of an older version have ``""``).
_RUN_ID = re.compile(r"[0-9a-f]{32}")
#: The most bytes read from a marker (it holds about 80).
_MARKER_MAX_BYTES = 4096
#: Statuses that do not count as measured when a resume looks for what a save left undone.
UNFINISHED = ("interrupted",)


def new_run_id() -> str:
    """A fresh run id: 32 random hex digits."""
    return uuid.uuid4().hex


def is_run_id(value: Any) -> bool:
    """Whether ``value`` is a run id this package draws (32 lowercase hex digits)."""
    return isinstance(value, str) and _RUN_ID.fullmatch(value) is not None


class RunJournal(Journal):
    """A journal that stamps every record it appends with one training run's id.

    Args:
        root: the folder (created).
        run: the training run's id (:func:`new_run_id`, or the resumed run's).
        save_tensors: see :class:`~uma_callbacks.engine.journal.Journal`.
    """

    def __init__(self, root: str | os.PathLike[str], run: str, save_tensors: bool = False) -> None:
        super().__init__(root, save_tensors=save_tensors)
        self.run = run

    def append(self, record: Record) -> None:
        """Stamp ``record`` with :attr:`run`, then append it.

        The stamp replaces whatever it carried: a cache hit copies another run's record.
        """
        record.run = self.run
        super().append(record)


# ---------------------------------------------------------------------- checkpoint markers
def write_run_marker(folder: str | os.PathLike[str], run: str, step: int) -> Path | None:
    """Write :data:`RUN_FILE` into a checkpoint folder (atomically); None if it could not be.

    A failure (full disk, read-only folder) is a warning: the journal still knows the run.
    """
    path = Path(folder) / RUN_FILE
    tmp = path.with_name(path.name + ".tmp")
    try:
        if not Path(folder).is_dir():
            return None
        tmp.write_text(json.dumps({"format": RUN_FORMAT, "run": run, "step": int(step)}), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:
        logger.warning("uma: could not write %s (%s); a resume from it finds its run in the journal", path, err)
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        return None
    return path


def read_run_marker(folder: str | os.PathLike[str], step: int | None = None) -> str | None:
    """The run id in ``folder``'s :data:`RUN_FILE` when it is one and names ``step``, else None.

    Any step is accepted when ``step`` is ``None``. The file is data from disk: anything but a
    small JSON object with a valid ``run`` and ``step == step`` (a symlink, a huge file, a
    hand edit) is ignored with a warning.
    """  # noqa: DOC501 (the ValueError for an oversized file is caught below: nothing is raised)
    path = Path(folder) / RUN_FILE
    try:
        if path.is_symlink() or not path.is_file():
            return None
        with open(path, "rb") as fh:
            raw = fh.read(_MARKER_MAX_BYTES + 1)
        if len(raw) > _MARKER_MAX_BYTES:
            raise ValueError(f"larger than {_MARKER_MAX_BYTES} bytes")
        data = json.loads(raw)
    except (OSError, ValueError, RecursionError, MemoryError) as err:
        logger.warning("uma: %s ignored (%s: %s)", path, type(err).__name__, err)
        return None
    if not isinstance(data, dict) or not is_run_id(data.get("run")):
        logger.warning("uma: %s ignored: not a run marker", path)
        return None
    if step is not None and (data.get("step") != int(step) or isinstance(data.get("step"), bool)):
        logger.warning("uma: %s ignored: it names step %r, the checkpoint is at step %d", path, data.get("step"), step)
        return None
    return data["run"]


# ---------------------------------------------------------------------- the journal's runs
def resumed_run(journal: Journal, step: int, folders: Iterable[str | os.PathLike[str]] = ()) -> str | None:
    """The run a training resumed at ``step`` continues, or None (then it is a new run).

    The first checkpoint folder of ``folders`` whose :data:`RUN_FILE` names ``step`` decides;
    without one, the journal: the run of the newest record at ``step`` (a save that was
    measured, at least in part), else of the newest record before ``step``.
    """
    for folder in folders:
        run = read_run_marker(folder, step)
        if run is not None:
            return run
    records = journal.records()
    for wanted in (lambda r: r.step == step, lambda r: r.step < step):
        for record in reversed(records):
            if record.metric and wanted(record):
                return record.run
    return None


def measured_metrics(journal: Journal, run: str, step: int) -> set[str]:
    """The metrics ``run`` holds a finished record of at ``step`` (any status but :data:`UNFINISHED`)."""
    return {r.metric for r in journal.records() if r.run == run and r.step == step and r.status not in UNFINISHED}


def tracker_run(journal: Journal, run: str, sink: str) -> dict[str, str] | None:
    """``{"run", "uri"}`` of the tracker run that ``sink`` last delivered a record of ``run`` to."""
    ids = {r.record_id for r in journal.records() if r.run == run}
    payloads, _ = read_lines(journal.root / DELIVERIES_FILE)
    found = None
    for p in payloads:
        if isinstance(p, dict) and p.get("sink") == sink and p.get("id") in ids and isinstance(p.get("run"), str) and p["run"]:
            uri = p.get("uri")
            found = {"run": p["run"], "uri": uri if isinstance(uri, str) else ""}
    return found


def runs_held(records: Iterable[Record], delivered: set[str]) -> set[str]:
    """The training runs whose records a tracker run holds (``delivered``: its record ids)."""
    return {r.run for r in records if r.record_id in delivered}


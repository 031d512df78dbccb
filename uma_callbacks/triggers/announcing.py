"""What a live trigger with ``measure="async"`` writes instead of measuring.

:class:`Announcer` writes the announcements of :mod:`~uma_callbacks.engine.announce`
(``<journal>/watch.jsonl``) for one session, on world rank 0:

- :meth:`Announcer.run`: the ``run`` line, with the session's run id, the tracker runs its
  sinks joined (:func:`tracker_identity`) and the configured metrics (:func:`metric_specs`);
  written again whenever one of these changed (a resume continuing another run id, a
  tracker that was down at the start and came back at a later save);
- :meth:`Announcer.checkpoint`: a complete checkpoint folder, after the save finished (its
  weight files hard-linked into the journal folder, then the line);
- :meth:`Announcer.finished`: the end of training.

An announcement that cannot be written (full disk) is warned about and written at the next
save or at the end, never raised into the training loop. The probe is the session's
``probe.safetensors``, saved when it opened.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from uma_callbacks.config import UMAConfig, metric_spec
from uma_callbacks.engine.announce import (
    HELD_PATTERNS,
    announce_checkpoint,
    announce_finished,
    announce_run,
)
from uma_callbacks.integrations.bounded import rearm
from uma_callbacks.session import Session

logger = logging.getLogger(__name__)


def metric_specs(config: UMAConfig) -> list[dict[str, Any]]:
    """``[{"name", option: value}]``: the configured metrics as the watcher rebuilds them.

    Each entry is :func:`~uma_callbacks.config.metric_spec`: ``build_metric(entry)``
    gives the same class and ``config()`` (``UMAConfig(measure="async")`` checked it).
    """
    return [metric_spec(m) for m in config.metric_objects]


def tracker_identity(sinks: Iterable[Any]) -> dict[str, dict[str, str]]:
    """The tracker runs ``sinks`` log into, as a watcher joins them.

    Returns:
        ``{"mlflow": {"run": MLflow run id, "uri": tracking URI}, "wandb": {"run": run id,
        "entity", "project", "dir": the folder wandb.init(dir=...) took (the run's files
        are under <dir>/wandb/)}}``, for the sinks that have joined or opened a run;
        empty values left out.
    """
    out: dict[str, dict[str, str]] = {}
    for sink in sinks:
        inner = getattr(sink, "wrapped", sink)  # a bounded sink: read the attributes directly, no tracker call
        name = getattr(inner, "name", "")
        if name == "mlflow":
            entry = {"run": _text(inner.run_id()), "uri": _text(getattr(inner, "tracking_uri", ""))}
        elif name == "wandb":
            run = getattr(inner, "run", None)
            if run is None:
                continue
            settings = getattr(run, "settings", None)
            entry = {
                "run": _text(getattr(run, "id", "")),
                "entity": _text(getattr(run, "entity", "")),
                "project": _text(getattr(run, "project", "")),
                "dir": _text(getattr(settings, "root_dir", "")),
            }
        else:
            continue
        entry = {k: v for k, v in entry.items() if v}
        if entry.get("run") and name not in out:
            out[name] = entry
    return out


def detach_held(folder: str | os.PathLike[str]) -> None:
    """Unlink ``folder``'s held files before a save writes into it again.

    A save rewrites a file in place (same inode), which would change the hard-linked copy a
    watcher is to measure; unlinked first, the copy keeps the old contents and the save
    writes a new file. Only files with another link are touched.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    for pattern in HELD_PATTERNS:
        for path in folder.glob(pattern):
            try:
                if path.is_file() and not path.is_symlink() and path.stat().st_nlink > 1:
                    path.unlink()
            except OSError as err:
                logger.warning("uma: %s not detached from its held copy (%s)", path, err)


class Announcer:
    """The announcements of one session (world rank 0 writes; the other ranks do nothing).

    Args:
        session: the started session (probe saved, sinks resolved or to be added later).
        run_dir: the folder the checkpoint folders are in (the watcher's ``RUN_DIR``).
    """

    def __init__(self, session: Session, run_dir: str | os.PathLike[str]) -> None:
        self.session = session
        self.run_dir = Path(run_dir)
        self._announced: tuple[str, Any, Any] | None = None
        #: ``(step, folder, held name)`` not yet announced (a write failed)
        self._pending: list[tuple[int, Path, str | None]] = []
        self._outside_warned = False

    @property
    def root(self) -> Path:
        """The journal folder."""
        return self.session.root

    def run(self) -> None:
        """Write the ``run`` line when the run, its tracker runs or its metrics differ from the last written.

        A sink that failed to start (tracker down) is tried again first, as a measuring
        session does at each save (each call bounded by ``tracker_timeout_seconds``): the
        tracker run it then opens is announced.
        """
        if not self.session.is_main:
            return
        if self.session.delivery.failing:
            rearm(self.session.sinks)
            self.session.delivery.send_pending()  # starts the sinks; this run has no records to replay
        trackers = tracker_identity(self.session.sinks)
        metrics = metric_specs(self.session.config)
        current = (self.session.run, trackers, metrics)
        if current == self._announced:
            return
        try:
            announce_run(self.root, self.session.run, trackers, metrics)
        except OSError as err:
            logger.warning("uma: the run announcement was not written (%s); tried again at the next save", err)
            return
        self._announced = current

    def checkpoint(self, step: int, folder: str | os.PathLike[str], held_name: str | None = None) -> None:
        """Announce the complete checkpoint ``folder`` at ``step`` (after the save finished).

        Also writes what an earlier failure left unwritten, and the ``run`` line first when
        it changed.
        """
        if not self.session.is_main:
            return
        folder = Path(folder)
        if not self._outside_warned and not _inside(folder, self.run_dir):
            self._outside_warned = True
            logger.warning(
                "uma: checkpoint folder %s is outside %s: a watcher of that folder does not take it; save inside it",
                folder,
                self.run_dir,
            )
        self._pending.append((int(step), folder, held_name))
        self.flush()

    def flush(self) -> bool:
        """Write the pending announcements, oldest first; returns whether none is left."""
        if not self.session.is_main:
            return True
        self.run()
        while self._pending:
            step, folder, held_name = self._pending[0]
            try:
                announce_checkpoint(self.root, self.run_dir, step, folder, **({"held_name": held_name} if held_name else {}))
            except OSError as err:
                logger.warning("uma: checkpoint %s not announced yet (%s); tried again at the next save", folder, err)
                return False
            self._pending.pop(0)
        return True

    def finished(self, step: int) -> None:
        """Write what is pending, then the ``finished`` line."""
        if not self.session.is_main:
            return
        if not self.flush():
            logger.warning("uma: %d checkpoint(s) could not be announced (disk full?)", len(self._pending))
        try:
            announce_finished(self.root, int(step))
        except OSError as err:
            logger.warning("uma: the end of training was not announced (%s)", err)


def _inside(folder: Path, base: Path) -> bool:
    try:
        folder.resolve().relative_to(base.resolve())
    except ValueError:
        return False
    return True


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ("" if value is None else str(value))


__all__ = ["Announcer", "detach_held", "metric_specs", "tracker_identity"]

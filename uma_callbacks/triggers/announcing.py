"""What a live trigger with ``measure="async"`` writes instead of measuring.

:class:`Announcer` writes the announcements of :mod:`~uma_callbacks.engine.announce`
(``<journal>/watch.jsonl``) for one session, on world rank 0:

- :meth:`Announcer.run`: the ``run`` line, with the session's run id, the tracker runs its
  sinks joined (:func:`tracker_identity`) and the configured metrics (:func:`metric_specs`);
  written again whenever one of these changed (a resume continuing another run id, a
  tracker that was down at the start and came back at a later save);
- :meth:`Announcer.checkpoint`: a complete checkpoint folder, after the save finished (its
  weight files, and its optimizer file when a configured metric reads the optimizer,
  hard-linked into the journal folder, then the line);
- :meth:`Announcer.finished`: the end of training.

A full disk never reaches the training loop, and costs as little as it can:

- the held copy is made at the save itself, before the Trainer's rotation can delete the
  folder; a line that cannot be written is warned about (naming the checkpoint and the
  error) and written at the next save or at the end, with the held copy made at the save
  and the time of the save;
- a copy that could not be held (no space for the links) is tried again at the next save
  while the folder exists; once it is gone, the line says why it was not held
  (``unheld``), and the watcher's error record for that checkpoint names the reason;
- at the end, what still could not be written is named in one warning, with the way to
  measure it later (``uma backfill``).

The probe is the session's ``probe.safetensors``, saved when it opened.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uma_callbacks.config import UMAConfig, metric_spec
from uma_callbacks.engine.announce import (
    HELD_DIR,
    HELD_PATTERNS,
    OPTIMIZER_PATTERNS,
    announce_finished,
    announce_run,
    hold_checkpoint,
    write_checkpoint_line,
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
    writes a new file. Only files with another link are touched (weights and optimizer files).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    for pattern in (*HELD_PATTERNS, *OPTIMIZER_PATTERNS):
        for path in folder.glob(pattern):
            try:
                if path.is_file() and not path.is_symlink() and path.stat().st_nlink > 1:
                    path.unlink()
            except OSError as err:
                logger.warning("uma: %s not detached from its held copy (%s)", path, err)


@dataclass
class _Pending:
    """A checkpoint whose line is not written yet: its held copy (made at the save) or why none was."""

    step: int
    folder: Path
    held_name: str
    saved: float
    held: Path | None = None
    unheld: str = ""


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
        #: checkpoints not announced yet (a write failed), oldest first
        self._pending: list[_Pending] = []
        self._outside_warned = False
        self._warned: set[tuple[str, int]] = set()

    @property
    def root(self) -> Path:
        """The journal folder."""
        return self.session.root

    @property
    def pending(self) -> list[int]:
        """The steps of the checkpoints not announced yet (a write failed), oldest first."""
        return [p.step for p in self._pending]

    @property
    def patterns(self) -> tuple[str, ...]:
        """The files held of each checkpoint: its weights, and its optimizer file when a metric reads it."""
        reads_optimizer = any(m.needs_optimizer for m in self.session.config.metric_objects)
        return (*HELD_PATTERNS, *OPTIMIZER_PATTERNS) if reads_optimizer else HELD_PATTERNS

    def run(self) -> bool:
        """Write the ``run`` line when the run, its tracker runs or its metrics differ from the last written.

        A sink that failed to start (tracker down) is tried again first, as a measuring
        session does at each save (each call bounded by ``tracker_timeout_seconds``): the
        tracker run it then opens is announced.

        Returns:
            Whether the ``run`` line on disk is current.
        """
        if not self.session.is_main:
            return True
        if self.session.delivery.failing:
            rearm(self.session.sinks)
            self.session.delivery.send_pending()  # starts the sinks; this run has no records to replay
        trackers = tracker_identity(self.session.sinks)
        metrics = metric_specs(self.session.config)
        current = (self.session.run, trackers, metrics)
        if current == self._announced:
            return True
        try:
            announce_run(self.root, self.session.run, trackers, metrics)
        except OSError as err:
            logger.warning("uma: the run announcement was not written (%s); tried again at the next save", err)
            return False
        self._announced = current
        return True

    def checkpoint(self, step: int, folder: str | os.PathLike[str], held_name: str | None = None) -> None:
        """Announce the complete checkpoint ``folder`` at ``step`` (after the save finished).

        Its files are held now (before a rotation can delete the folder); then its line,
        what an earlier failure left unwritten and the ``run`` line first when it changed
        are written (:meth:`flush`).
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
        entry = _Pending(int(step), folder, held_name or folder.name, time.time())
        self._hold(entry)
        self._pending.append(entry)
        self.flush()

    def flush(self) -> bool:
        """Write the pending announcements, oldest first; returns whether none is left.

        A checkpoint not held yet (no space for the links at its save) is tried again first,
        while its folder exists.
        """
        if not self.session.is_main:
            return True
        self.run()
        while self._pending:
            entry = self._pending[0]
            if entry.held is None and entry.unheld:
                self._hold(entry)
            try:
                write_checkpoint_line(self.root, self.run_dir, entry.step, entry.folder, entry.held, entry.unheld, entry.saved)
            except OSError as err:
                self._warn_once("line", entry, f"uma: checkpoint {entry.folder} (step {entry.step}) not announced yet "
                                f"({type(err).__name__}: {err}); its line is written at the next save"
                                + ("; its files are held meanwhile" if entry.held is not None else ""))  # fmt: skip
                return False
            if entry.held is None and entry.unheld:
                logger.warning(
                    "uma: checkpoint %s (step %d) announced without a held copy (%s): a watcher measures it only while "
                    "the folder exists", entry.folder, entry.step, entry.unheld,
                )  # fmt: skip
            self._pending.pop(0)
        return True

    def finished(self, step: int) -> None:
        """Write what is pending, then the ``finished`` line."""
        if not self.session.is_main:
            return
        if not self.flush():
            logger.warning(
                "uma: %d checkpoint(s) could not be announced (disk full?): %s; a watcher does not measure them: "
                "free space and measure them with `uma backfill %s`",
                len(self._pending), ", ".join(f"{p.folder} (step {p.step})" for p in self._pending), self.run_dir,
            )  # fmt: skip
        try:
            announce_finished(self.root, int(step))
        except OSError as err:
            logger.warning(
                "uma: the end of training was not announced (%s); a watcher started with --until-done does not stop "
                "by itself: stop it with Ctrl-C once it has measured step %d", err, int(step),
            )  # fmt: skip

    def _hold(self, entry: _Pending) -> None:
        """Hard-link ``entry``'s files into ``held/`` (its folder still there); a failure is kept as ``unheld``."""
        try:
            held = hold_checkpoint(entry.folder, self.root / HELD_DIR / entry.held_name, self.patterns)
        except OSError as err:
            entry.unheld = f"{type(err).__name__}: {err}"
            self._warn_once("hold", entry, f"uma: checkpoint {entry.folder} (step {entry.step}) not held ({entry.unheld}); "
                            "tried again at the next save while the folder exists; a watcher reads the folder while it exists")  # fmt: skip
            return
        if held is not None:
            entry.held, entry.unheld = held, ""

    def _warn_once(self, what: str, entry: _Pending, message: str) -> None:
        """One warning per checkpoint and kind of failure (a full disk fails again at every retry)."""
        if (what, entry.step) not in self._warned:
            self._warned.add((what, entry.step))
            logger.warning("%s", message)


def _inside(folder: Path, base: Path) -> bool:
    try:
        folder.resolve().relative_to(base.resolve())
    except ValueError:
        return False
    return True


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ("" if value is None else str(value))


__all__ = ["Announcer", "detach_held", "metric_specs", "tracker_identity"]

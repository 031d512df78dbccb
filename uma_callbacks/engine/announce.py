"""What a training that measures asynchronously tells its watcher: ``<journal>/watch.jsonl``.

With ``measure="async"`` the trigger does not measure; at each save it writes what a
separate process (``uma watch``) needs to measure that checkpoint later, and returns. One
JSON object per line, appended with one ``write`` each (a reader sees whole lines or a torn
last line, which it skips):

- ``{"kind": "run", "run", "trackers", "metrics", "time"}`` at train begin (and again on a
  resume): the training run's id (:mod:`~uma_callbacks.engine.run_identity`), the tracker
  runs the watcher logs into (``{"mlflow": {"run", "uri"}, "wandb": {"run", "entity",
  "project", "dir"}}``), and the metrics the trigger was configured with (``[{"name", **config}]``,
  the watcher's default);
- ``{"kind": "checkpoint", "step", "folder", "held", "time"[, "unheld"]}`` after a save has
  finished (the Trainer's ``on_save`` comes after ``trainer_state.json``, the last file it
  writes): ``folder`` is the checkpoint folder relative to the run folder; ``held`` is the
  copy of its weight files (and its optimizer file when a configured metric reads it) kept in
  the journal folder (hard links, :func:`hold_checkpoint`), relative to the journal folder,
  or ``""`` where none was made; ``unheld`` is why one could not be made (another
  filesystem, no space left), so that a watcher that finds the folder gone says why;
- ``{"kind": "finished", "step", "time"}`` at train end.

The probe is the journal's ``probe.safetensors`` (written at train begin, as for a backfill).

Nothing here is trusted when read back (:func:`read_announcements`): every line is parsed
with the journal's bounded parser, every field is checked, and every path must stay inside
its folder; a line that fails is counted and skipped.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uma_callbacks.core.process_identity import ProcessIdentity, this_process
from uma_callbacks.engine.journal import append_line, read_lines
from uma_callbacks.engine.run_identity import is_run_id

logger = logging.getLogger(__name__)

#: The announcement file, in the journal folder.
WATCH_FILE = "watch.jsonl"
#: Where held copies of checkpoints live, in the journal folder.
HELD_DIR = "held"
#: Files of a checkpoint folder a watcher needs to rebuild the model at its step; the
#: optimizer, scheduler and RNG states are not held.
HELD_PATTERNS = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model*.bin.index.json",
    "trainer_state.json",
    "uma_run.json",
)
#: Optimizer files a checkpoint may hold (the Trainer's, Accelerate's first optimizer), held
#: too when a configured metric reads the optimizer (``Metric.needs_optimizer``).
OPTIMIZER_PATTERNS = ("optimizer.pt", "optimizer.bin")
#: Tracker names and the string fields each may carry in a ``run`` line.
TRACKER_FIELDS = {"mlflow": ("run", "uri"), "wandb": ("run", "entity", "project", "dir")}
#: Bounds on what a line may hold.
_MAX_FIELD_CHARS = 4096
_MAX_METRICS = 64


@dataclass
class RunAnnouncement:
    """The ``run`` line: which training run, which tracker runs, which metrics."""

    run: str
    trackers: dict[str, dict[str, str]] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    time: float = 0.0
    #: the training process (host, pid, start time), or None (an older line, or a field that
    #: did not validate): a watcher on the same host sees a training that died unfinished.
    process: ProcessIdentity | None = None


@dataclass
class CheckpointAnnouncement:
    """A ``checkpoint`` line: a complete checkpoint at ``step``.

    Attributes:
        step: its global step.
        folder: the checkpoint folder (absolute, inside the run folder).
        held: the held copy of its weight files (absolute, inside the journal folder), or None.
        time: when the save finished (seconds since the epoch).
        unheld: why no held copy could be made (the error), or ``""``.
    """

    step: int
    folder: Path
    held: Path | None
    time: float = 0.0
    unheld: str = ""


@dataclass
class Announcements:
    """Everything ``watch.jsonl`` says, validated.

    Attributes:
        run: the latest ``run`` line (a resumed training writes it again), or None.
        checkpoints: ``{step: announcement}``, the latest line per step.
        finished: the step of the ``finished`` line after the latest ``run`` line, or None.
        bad_lines: lines skipped (torn, foreign shape, path outside its folder).
    """

    run: RunAnnouncement | None = None
    checkpoints: dict[int, CheckpointAnnouncement] = field(default_factory=dict)
    finished: int | None = None
    bad_lines: int = 0


def announce_run(
    root: str | os.PathLike[str],
    run: str,
    trackers: Mapping[str, Mapping[str, str]],
    metrics: Sequence[Mapping[str, Any]],
) -> None:
    """Append the ``run`` line (train begin).

    Raises:
        ValueError: ``run`` is not a run id.
    """
    if not is_run_id(run):
        raise ValueError(f"announce_run: run must be 32 lowercase hex digits; got {run!r:.80}")
    clean = {
        name: {k: str(v) for k, v in dict(entry).items() if k in TRACKER_FIELDS[name] and v is not None}
        for name, entry in trackers.items()
        if name in TRACKER_FIELDS
    }
    payload = {
        "kind": "run",
        "run": run,
        "trackers": clean,
        "metrics": [dict(m) for m in metrics],
        "time": time.time(),
        "process": this_process().as_dict(),
    }
    append_line(Path(root) / WATCH_FILE, payload)


def announce_checkpoint(
    root: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    step: int,
    folder: str | os.PathLike[str],
    held_name: str | None = None,
    patterns: Sequence[str] = HELD_PATTERNS,
) -> Path | None:
    """Hold ``folder``'s weight files and append its ``checkpoint`` line (after the save finished).

    ``held_name``: the held copy's folder name in ``held/`` (default ``folder``'s name); a
    folder saved into again at another step (``accelerator.save_state("ckpt")``) needs one
    per step. ``patterns``: the files held (:data:`HELD_PATTERNS`, plus
    :data:`OPTIMIZER_PATTERNS` for a metric that reads the optimizer).

    Returns:
        The held copy, or None where it could not be made (another filesystem, no space: the
        line says why) or there was nothing to hold: the watcher then reads the checkpoint
        folder itself, while it exists.

    Raises:
        OSError: the line could not be written (full disk); the held copy, if made, stays.
    """  # noqa: DOC502 (from append_line)
    root, folder = Path(root), Path(folder)
    try:
        held, unheld = hold_checkpoint(folder, root / HELD_DIR / (held_name or folder.name), patterns), ""
    except OSError as err:
        held, unheld = None, f"{type(err).__name__}: {err}"
        logger.warning("uma: checkpoint %s not held (%s); the watcher reads it while it exists", folder, unheld)
    write_checkpoint_line(root, run_dir, step, folder, held, unheld)
    return held


def write_checkpoint_line(
    root: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    step: int,
    folder: str | os.PathLike[str],
    held: Path | None,
    unheld: str = "",
    saved: float | None = None,
) -> None:
    """Append the ``checkpoint`` line of ``folder`` at ``step``, whose held copy is ``held``.

    ``unheld``: why no copy could be held (written only when ``held`` is None);
    ``saved``: when the save finished (default: now), kept when the line is written late.

    Raises:
        OSError: the line could not be written (full disk).
    """  # noqa: DOC502 (from append_line)
    root, run_dir, folder = Path(root), Path(run_dir), Path(folder)
    try:
        rel_folder = str(folder.resolve().relative_to(run_dir.resolve()))
    except ValueError:
        rel_folder = str(folder.resolve())  # outside the run folder: the reader refuses it
    payload: dict[str, Any] = {
        "kind": "checkpoint",
        "step": int(step),
        "folder": rel_folder,
        "held": str(held.relative_to(root)) if held is not None else "",
        "time": time.time() if saved is None else float(saved),
    }
    if held is None and unheld:
        payload["unheld"] = unheld[:_MAX_FIELD_CHARS]
    append_line(root / WATCH_FILE, payload)


def announce_finished(root: str | os.PathLike[str], step: int) -> None:
    """Append the ``finished`` line (train end)."""
    append_line(Path(root) / WATCH_FILE, {"kind": "finished", "step": int(step), "time": time.time()})


def hold_checkpoint(folder: Path, target: Path, patterns: Sequence[str] = HELD_PATTERNS) -> Path | None:
    """Hard-link ``folder``'s files matching ``patterns`` (default: its weight files) into ``target``.

    A hard link costs no space and survives the Trainer deleting the checkpoint
    (``save_total_limit``).

    Returns:
        ``target``, or None when ``folder`` holds nothing to hold (gone, or no weight files).

    Raises:
        OSError: a link could not be made (another filesystem, no space left); the partial
            copy is removed.
    """
    names = sorted({p.name for pattern in patterns for p in folder.glob(pattern) if p.is_file() and not p.is_symlink()})
    if not names:
        return None
    try:
        target.mkdir(parents=True, exist_ok=True)
        for name in names:
            dest = target / name
            if dest.exists():
                dest.unlink()
            os.link(folder / name, dest)
    except OSError:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return target


def release_held(root: str | os.PathLike[str], held: Path | None) -> None:
    """Remove a held copy (after it was measured and is no longer needed as history)."""
    if held is None:
        return
    base = (Path(root) / HELD_DIR).resolve()
    try:
        held.resolve().relative_to(base)
    except ValueError:
        logger.warning("uma: not removing %s: outside %s", held, base)
        return
    shutil.rmtree(held, ignore_errors=True)


def read_announcements(root: str | os.PathLike[str], run_dir: str | os.PathLike[str]) -> Announcements:
    """Read and validate ``watch.jsonl``; an absent file reads as empty.

    Lines of a run other than the latest ``run`` line's are kept (a resume continues the
    same run id); ``finished`` counts only when it comes after the latest ``run`` line.
    """
    root, run_dir = Path(root), Path(run_dir)
    out = Announcements()
    path = root / WATCH_FILE
    if not path.is_file():
        return out
    payloads, bad = read_lines(path)
    out.bad_lines = bad
    for payload in payloads:
        try:
            _take(out, payload, root, run_dir)
        except (ValueError, TypeError, KeyError, OverflowError) as err:
            out.bad_lines += 1
            logger.debug("uma: %s line skipped: %s", WATCH_FILE, err)
    return out


def _take(out: Announcements, payload: Any, root: Path, run_dir: Path) -> None:
    if not isinstance(payload, dict):
        raise TypeError("not an object")
    kind = payload.get("kind")
    if kind == "run":
        run = payload.get("run")
        if not is_run_id(run):
            raise ValueError("run id")
        trackers: dict[str, dict[str, str]] = {}
        for name, entry in dict(payload.get("trackers") or {}).items():
            if name in TRACKER_FIELDS and isinstance(entry, dict):
                trackers[name] = {k: _text(entry[k]) for k in TRACKER_FIELDS[name] if k in entry}
        metrics = payload.get("metrics") or []
        if not isinstance(metrics, list) or len(metrics) > _MAX_METRICS or not all(
            isinstance(m, dict) and isinstance(m.get("name"), str) for m in metrics
        ):
            raise ValueError("metrics")
        try:
            process = ProcessIdentity.from_dict(payload["process"]) if "process" in payload else None
        except ValueError as err:
            logger.debug("uma: %s run line: %s; its training process is not followed", WATCH_FILE, err)
            process = None
        out.run = RunAnnouncement(
            run=run, trackers=trackers, metrics=metrics, time=_number(payload.get("time", 0.0)), process=process
        )
        out.finished = None
    elif kind == "checkpoint":
        step = payload.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError("step")
        folder = _inside(run_dir, _text(payload.get("folder")))
        held_rel = _text(payload.get("held", ""))
        held = _inside(root / HELD_DIR, held_rel, base=root) if held_rel else None
        unheld = _text(payload["unheld"]) if "unheld" in payload else ""
        out.checkpoints[step] = CheckpointAnnouncement(step, folder, held, _number(payload.get("time", 0.0)), unheld)
    elif kind == "finished":
        step = payload.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError("step")
        out.finished = step
    else:
        raise ValueError(f"kind {kind!r:.40}")


def _text(value: Any) -> str:
    if not isinstance(value, str) or len(value) > _MAX_FIELD_CHARS or "\x00" in value:
        raise ValueError("text field")
    return value


def _number(value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError("number")
    return float(value)


def _inside(folder: Path, rel: str, base: Path | None = None) -> Path:
    """``base / rel`` when it resolves inside ``folder`` (``base`` defaults to ``folder``).

    Raises:
        ValueError: ``rel`` is empty, absolute, or resolves outside ``folder``.
    """
    if not rel or os.path.isabs(rel):
        raise ValueError(f"path {rel!r:.80} is not relative")
    path = ((base or folder) / rel).resolve()
    path.relative_to(folder.resolve())  # ValueError when outside
    return path


__all__ = [
    "HELD_DIR",
    "HELD_PATTERNS",
    "OPTIMIZER_PATTERNS",
    "WATCH_FILE",
    "Announcements",
    "CheckpointAnnouncement",
    "RunAnnouncement",
    "announce_checkpoint",
    "announce_finished",
    "announce_run",
    "hold_checkpoint",
    "read_announcements",
    "release_held",
    "write_checkpoint_line",
]

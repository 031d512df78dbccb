"""The journal: the durable local record of every result, and the cache.

Layout under ``<output_dir>/uma/``::

    journal.jsonl                 one self-checking line per record
    deliveries.jsonl              one line per (sink, run, record id) delivered
    figures.jsonl                 figures written after their record (a live training's;
                                  :mod:`~uma_callbacks.engine.figure_notes`)
    claims/<cache key>.lock       held (``flock``) while a process computes that key
    step-<N>/<metric>.json        the full result (scalars, arrays, meta)
    step-<N>/<metric>.npz         its arrays (numpy, ``allow_pickle=False`` on read)
    step-<N>/<metric>.safetensors its tensors (e.g. the Fisher diagonal), when kept
    step-<N>/<metric>-*.png       figures

Each journal line is ``{"sha": sha256(payload)[:16], "record": payload}``.

Reading. A line whose checksum does not match (a torn write after ``kill -9``), and a
line with a valid checksum whose payload does not have the record's shape
(:func:`~uma_callbacks.core.records.check_record_dict`: another version, a hand edit),
is skipped and counted in :attr:`Journal.bad_lines` (with one warning). The journal is
read incrementally: a :class:`Journal` keeps the records it has parsed and the byte
offset it reached, and each :meth:`Journal.records` / :meth:`Journal.lookup` reads only
what was appended since (by this process or another), so a cache lookup is a dict access,
not a re-read of the file. A file that was replaced or truncated (a different inode, a
shorter size, or changed bytes just before the offset) is read again from the start.

Writing. Lines are appended with ``os.write`` on an ``O_APPEND`` descriptor, under an
exclusive ``fcntl.flock`` of the file (so concurrent writers never interleave), and
``fsync``-ed: a reader sees whole lines or a torn last one. A failed write (disk full,
quota, I/O error) is cut back off the file (``ftruncate`` to the size before), so
nothing half-written stays; the record is kept in memory (it is still returned by
:meth:`Journal.records` and :meth:`Journal.lookup`), one warning is logged per outage,
and the write is retried at the next append and at :meth:`Journal.flush`. Neither
:meth:`Journal.append`, :meth:`Journal.mark_delivered` nor :meth:`Journal.write_files`
raises ``OSError``.

Files. A result's files (JSON, npz, safetensors, PNG figures) are serialised in memory and
written by :mod:`~uma_callbacks.core.safe_write`: the ``step-<N>`` folder (and a variant
subfolder) is opened without following links, each file goes to a fresh temporary name,
is ``fsync``-ed and renamed into place. A folder or a target name that is a symbolic link
(planted to make the write land elsewhere) is refused: nothing is written through it, a
warning names it, and the record lists it in ``missing_files`` with the reason. A file
that fails to write (disk full) leaves nothing behind (no empty PNG, no partial npz); its
bytes are kept in memory and written again at each :meth:`Journal.flush` while the
record's own line is still pending, so the record goes to disk naming the files that made
it. Once the record's line is written, its files are final: those that never made it stay
named in ``missing_files``. Each file written is noted in the record's ``file_ids`` (size
and sha256), so uploads send only files whose content is what the journal wrote
(:func:`~uma_callbacks.core.records.artifact_path`).

Why JSON lines and not SQLite: the journal is the one file users read, grep, copy and
diff, and the sinks, ``uma sync``, ``uma report`` and the backfill already share it; the
three things a database would add are here in a few lines each: the in-memory index
(incremental reads), the writers' lock (``flock``), and the schema (typed check on read).
Concurrent backfills split the work with :meth:`Journal.claim` (a per-key ``flock`` that
the kernel releases if the process dies).

The cache key is sha256 of (checkpoint identity, metric config, probe fingerprint): a
journalled ``ok`` record under the same key is a cache hit. The suite builds the checkpoint
identity from the weights fingerprint (every ``state_dict`` entry: parameters and persistent
buffers), the fingerprints of the earlier checkpoints a metric compares with, the loss
function's identity (:mod:`uma_callbacks.core.loss_identity`), the parameters' dtypes and the
attention implementation; a loss or a metric setting that cannot be identified turns the
cache off for it, with one warning.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from uma_callbacks.core.records import MEASURED, Record, RecordSchemaError, artifact_path, check_record_dict
from uma_callbacks.core.safe_json import MAX_LINE_BYTES, loads_bounded, read_json
from uma_callbacks.core.safe_write import RefusedPath, open_folder, put_file, write_atomically
from uma_callbacks.engine.figure_notes import FIGURES_FILE, apply_note, check_note, make_note
from uma_callbacks.metrics.base import MetricResult

logger = logging.getLogger(__name__)

JOURNAL_FILE = "journal.jsonl"
DELIVERIES_FILE = "deliveries.jsonl"
CLAIMS_DIR = "claims"
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")
#: Bytes before the read offset compared on each incremental read (detects a rewrite).
_GUARD = 64


def safe_name(name: str) -> str:
    """A file-name-safe version of ``name`` (no ``/``, no ``..``, no spaces)."""
    cleaned = _SAFE.sub("_", name).strip("._") or "unnamed"
    return cleaned[:120]


def cache_key(checkpoint: str, metric_config: dict[str, Any], probe: str) -> str:
    """sha256 over (checkpoint fingerprint, metric config, probe fingerprint)."""
    payload = json.dumps({"checkpoint": checkpoint, "config": metric_config, "probe": probe}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _checked_line(payload: dict[str, Any]) -> bytes:
    body = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    sha = hashlib.sha256(body.encode()).hexdigest()[:16]
    return (json.dumps({"sha": sha, "record": payload}, sort_keys=True, separators=(",", ":")) + "\n").encode()


def _parse_line(line: str | bytes) -> Any:
    """The payload of an intact line, or None (torn, flipped byte, too long or deep, not our format).

    The line is parsed by :func:`~uma_callbacks.core.safe_json.loads_bounded` (length and
    nesting bounded before parsing): no content makes this raise.
    """
    try:
        outer = loads_bounded(line, max_bytes=MAX_LINE_BYTES)
        if not isinstance(outer, dict):
            return None
        payload = outer["record"]
        body = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (ValueError, KeyError, TypeError, RecursionError, MemoryError):
        return None
    if hashlib.sha256(body.encode()).hexdigest()[:16] != outer.get("sha"):
        return None
    return payload


def _write_lines(path: Path, payloads: list[dict[str, Any]]) -> None:
    """Append ``payloads`` as self-checking lines: one locked, fsync-ed append, all or nothing.

    Raises:
        OSError: the write failed; the file is cut back to its size before the call.
    """
    data = b"".join(_checked_line(p) for p in payloads)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by close
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data  # a torn last line (kill -9 mid-write) stays on a line of its own
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                if written <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
                view = view[written:]
            os.fsync(fd)
        except OSError:
            try:
                os.ftruncate(fd, size)  # nothing half-written stays behind
            except OSError as cut:
                logger.warning("uma: could not cut a failed write off %s (%s); readers skip it as torn", path, cut)
            raise
    finally:
        os.close(fd)


def append_line(path: Path, payload: dict[str, Any]) -> None:
    """Append one self-checking JSON line atomically (one locked write, O_APPEND, fsync).

    Raises:
        OSError: the write failed (the file is left as it was).
    """  # noqa: DOC502 (from _write_lines)
    _write_lines(Path(path), [payload])


def read_lines(path: Path) -> tuple[list[Any], int]:
    """``(payloads, n_bad)``: every intact line of a journal file, and how many were not.

    Only checksums are checked here; :class:`Journal` also checks the record schema.
    """
    path = Path(path)
    if not path.exists():
        return [], 0
    good, bad = [], 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.strip():
                continue
            payload = _parse_line(line)
            if payload is None:
                bad += 1
            else:
                good.append(payload)
    return good, bad


class _LineLog:
    """An append-only file of self-checking lines, read incrementally."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._inode: int | None = None
        self._offset = 0
        self._guard = b""
        self.damaged = 0  # complete lines that failed the checksum
        self.torn_tail = False  # an unterminated last line (being written, or cut by a crash)

    def _reset(self) -> None:
        self._inode, self._offset, self._guard, self.damaged, self.torn_tail = None, 0, b"", 0, False

    def read_new(self) -> tuple[bool, list[Any]]:
        """``(restarted, payloads appended since the last call)``; restarted: read from the start."""
        try:
            fh = open(self.path, "rb")  # noqa: SIM115 (closed below)
        except FileNotFoundError:
            restarted = self._inode is not None
            self._reset()
            return restarted, []
        with fh:
            st = os.fstat(fh.fileno())
            restarted = False
            if self._inode is not None and (
                st.st_ino != self._inode
                or st.st_size < self._offset
                or os.pread(fh.fileno(), len(self._guard), self._offset - len(self._guard)) != self._guard
            ):
                self._reset()
                restarted = True
            self._inode = st.st_ino
            fh.seek(self._offset)
            data = fh.read(max(0, st.st_size - self._offset))
        cut = data.rfind(b"\n") + 1
        payloads = []
        for line in data[:cut].split(b"\n"):
            if not line.strip():
                continue
            payload = _parse_line(line)
            if payload is None:
                self.damaged += 1
            else:
                payloads.append(payload)
        self._offset += cut
        if cut:
            self._guard = (self._guard + data[:cut])[-_GUARD:]
        self.torn_tail = bool(data[cut:].strip())
        return restarted, payloads


class Journal:
    """Durable record + cache under ``root`` (usually ``<output_dir>/uma``).

    Args:
        root: the folder (created).
        save_tensors: write ``result.tensors`` as ``.safetensors`` files.

    Attributes:
        bad_lines: lines skipped at the last read: torn or altered (checksum) plus those
            of a foreign shape (:attr:`foreign_lines`).
        foreign_lines: lines with a valid checksum but not a record's shape.
        refused_files: ``files`` entries refused so far (outside the folder, a symlink
            out of it, not a file), by :meth:`resolve_file`.
        unreadable_files: result files skipped by :meth:`load_result` (damaged, not the
            result's shape, too large).
        pending: records not yet on disk (a failed write); retried by :meth:`flush`.
        refused_writes: files not written because their folder or name is a symbolic link
            (or not a folder / regular file), as paths relative to the root.
    """

    def __init__(self, root: str | os.PathLike[str], save_tensors: bool = False) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.save_tensors = save_tensors
        self.bad_lines = 0
        self.foreign_lines = 0
        self.refused_files: list[str] = []
        self.unreadable_files: list[str] = []
        self.pending: list[Record] = []
        self.refused_writes: list[str] = []
        self._pending_files: list[_PendingFiles] = []
        self._log = _LineLog(self.root / JOURNAL_FILE)
        self._records: list[Record] = []
        self._ok: dict[str, Record] = {}
        self._warned_bad = 0
        self._deliveries = _LineLog(self.root / DELIVERIES_FILE)
        self._delivered: dict[tuple[str, str], set[str]] = {}
        self._pending_deliveries: list[dict[str, str]] = []
        self._write_error: str | None = None
        self._claims: dict[str, int] = {}
        self._notes = _LineLog(self.root / FIGURES_FILE)
        self._figure_notes: dict[str, list[dict[str, Any]]] = {}
        self._by_id: dict[str, list[Record]] = {}
        self._pending_notes: list[dict[str, Any]] = []
        self._pending_figures: list[_PendingFiles] = []

    @property
    def path(self) -> Path:
        """The journal file."""
        return self.root / JOURNAL_FILE

    # ------------------------------------------------------------------ writes
    def write_files(self, result: MetricResult, step: int, subfolder: str = "") -> list[str]:
        """Write the result's JSON, npz and safetensors under ``step-<N>/[subfolder/]``; relative paths.

        A failing write (disk full) or a refused one (a link) is a warning, never an
        exception: the files written completely are returned, nothing partial is left.
        Nothing is retried (:meth:`write_result` does that for a record).
        """
        record = Record(step=int(step), metric=result.name, status="ok")
        self._write_into(record, self._folder_of(step, subfolder), self._contents(result, {}, record), retry=False)
        return record.files

    def write_result(
        self, record: Record, result: MetricResult, subfolder: str = "", figures: dict[str, bytes] | None = None
    ) -> None:
        """Write ``result``'s files and ``figures`` (``{file name: PNG bytes}``) for ``record``.

        Under ``step-<record.step>/[subfolder/]``. Sets ``record.files`` (written, relative
        to the root), ``record.file_ids`` (each one's size and sha256) and
        ``record.missing_files`` (``{relative path: why}``: refused as a link, or the error
        of a failed write). Files that failed to write are kept and written again by
        :meth:`flush` while ``record`` is pending (see the module docstring). Never raises
        ``OSError``.
        """
        contents = self._contents(result, figures or {}, record)
        self._write_into(record, self._folder_of(record.step, subfolder), contents, retry=True)

    def add_figures(self, record: Record, figures: dict[str, bytes], subfolder: str = "") -> None:
        """Write ``figures`` (``{file name: PNG bytes}``) of a record journalled already, and note them.

        Into ``step-<record.step>/[subfolder/]`` as :meth:`write_result` writes; ``record``'s
        ``files``, ``file_ids`` and ``missing_files`` are updated, and a line in
        ``figures.jsonl`` names them (:mod:`~uma_callbacks.engine.figure_notes`), so the
        record reads back with its figures. A figure that failed to write (disk full) is
        written again at each :meth:`flush` until it is; a refused one (a link) is not.
        Never raises ``OSError``.
        """
        if not figures:
            return
        folder = self._folder_of(record.step, subfolder)
        self._file_figures(record, folder, {safe_name(name): data for name, data in figures.items()})
        self.flush()

    def _file_figures(self, record: Record, folder: str, contents: dict[str, bytes]) -> None:
        """Write ``contents`` into ``folder`` for ``record``; note what was written, keep what failed."""
        self._write_into(record, folder, contents, retry=False)
        paths = {name: f"{folder}/{name}" for name in contents}
        written = [rel for rel in paths.values() if rel in record.files and rel in record.file_ids]
        missing = {rel: record.missing_files[rel] for rel in paths.values() if rel in record.missing_files}
        failed = {name: contents[name] for name, rel in paths.items() if not missing.get(rel, "refused").startswith("refused")}
        if failed:
            self._pending_figures.append(_PendingFiles(record, folder, failed))
        self._pending_notes.append(make_note(record, written, missing))

    @staticmethod
    def _folder_of(step: int, subfolder: str) -> str:
        return f"step-{int(step)}" + (f"/{safe_name(subfolder)}" if subfolder else "")

    def _contents(self, result: MetricResult, figures: dict[str, bytes], record: Record) -> dict[str, bytes]:
        """``{file name: bytes}`` of the result's files, then the figures.

        A file that cannot be serialised is left out and named in ``record.missing_files``.
        """
        base = safe_name(result.name)
        makers = [(f"{base}.json", lambda: _result_json(result))]
        if result.arrays:
            makers.append((f"{base}.npz", lambda: _npz_bytes(result.arrays)))
        if self.save_tensors and result.tensors:
            makers.append((f"{base}.safetensors", lambda: _safetensors_bytes(result.tensors)))
        contents: dict[str, bytes] = {}
        for name, make in makers:
            try:
                contents[name] = make()
            except Exception as err:  # noqa: BLE001 (a value that does not serialise is never worth a lost record)
                folder = self._folder_of(record.step, "")
                record.missing_files[f"{folder}/{name}"] = f"not serialisable: {type(err).__name__}: {err}"[:300]
                logger.warning("uma: %s of %s at step %d not written (%s: %s)", name, result.name, record.step, type(err).__name__, err)
        for name, data in figures.items():
            contents[safe_name(name)] = data
        return contents

    def _write_into(self, record: Record, folder: str, contents: dict[str, bytes], retry: bool) -> None:
        """Write ``contents`` into ``folder`` and note each outcome in ``record``.

        ``folder`` is relative to the root and opened without following links; with ``retry``,
        what failed is kept for :meth:`flush`.
        """
        failed: dict[str, bytes] = {}
        try:
            fd = open_folder(self.root, folder.split("/"))
        except RefusedPath as err:
            for name in contents:
                self._refused(record, f"{folder}/{name}", f"{err.filename} is {err.strerror}")
            return
        except OSError as err:
            self._write_failed(err, f"the files of {record.metric} at step {record.step}")
            for name in contents:
                record.missing_files[f"{folder}/{name}"] = f"{type(err).__name__}: {err.strerror or err}"
            failed = dict(contents)
        else:
            try:
                for name, data in contents.items():
                    rel = f"{folder}/{name}"
                    try:
                        ident = put_file(fd, name, data)
                    except RefusedPath as err:
                        self._refused(record, rel, f"{rel} is {err.strerror}")
                    except OSError as err:
                        self._write_failed(err, f"the files of {record.metric} at step {record.step}")
                        record.missing_files[rel] = f"{type(err).__name__}: {err.strerror or err}"
                        failed[name] = data
                    else:
                        if rel not in record.files:
                            record.files.append(rel)
                        record.file_ids[rel] = ident
                        record.missing_files.pop(rel, None)
            finally:
                os.close(fd)
        if failed and retry:
            self._pending_files.append(_PendingFiles(record, folder, failed))

    def _refused(self, record: Record, rel: str, why: str) -> None:
        self.refused_writes.append(rel)
        record.missing_files[rel] = f"refused: {why}"[:300]
        logger.warning(
            "uma: %s not written: %s (a write through it could land outside %s); the record of %s at step %d "
            "names it in missing_files; training goes on",
            rel, why, self.root, record.metric, record.step,
        )  # fmt: skip

    def _retry_files(self) -> None:
        """Write again the files that failed, of records whose line is still pending."""
        entries, self._pending_files = self._pending_files, []
        for entry in entries:
            if any(entry.record is r for r in self.pending):
                self._write_into(entry.record, entry.folder, entry.contents, retry=True)
                if not any(f"{entry.folder}/{name}" in entry.record.missing_files for name in entry.contents):
                    logger.warning("uma: the files of %s at step %d are written now", entry.record.metric, entry.record.step)

    def add_files(self, paths: Iterable[Path]) -> list[str]:
        """Relative paths of extra files already written under the root (by another writer).

        Raises:
            ValueError: a path that is not a regular file inside the root, or reaches it
                through a symbolic link (the file would not be where the record says).
        """  # noqa: DOC502 (from _relative)
        return [self._relative(Path(p)) for p in paths]

    def _relative(self, path: Path) -> str:
        root = self.root.resolve()
        absolute = Path(os.path.abspath(path if path.is_absolute() else Path.cwd() / path))
        try:
            rel = absolute.relative_to(os.path.abspath(self.root))
        except ValueError:
            try:
                rel = absolute.relative_to(root)
            except ValueError:
                raise ValueError(f"artifact path {path} escapes the journal folder {self.root}") from None
        walked = root
        for part in rel.parts:
            walked = walked / part
            if part in ("", ".", "..") or walked.is_symlink():
                raise ValueError(f"artifact path {path} escapes the journal folder {self.root} (through {walked})")
        if not walked.is_file():
            raise ValueError(f"artifact path {path} is not a file inside the journal folder {self.root}")
        return rel.as_posix()

    def append(self, record: Record) -> None:
        """Append a record; on a failed write keep it pending (see the module docstring).

        Raises:
            RecordSchemaError: ``record`` would not read back (a field of the wrong type).
        """  # noqa: DOC502 (from check_record_dict)
        check_record_dict(record.to_dict())
        self.pending.append(record)
        self.flush()

    def flush(self) -> bool:
        """Write what earlier failed writes left pending; True when nothing is pending any more.

        Files first (those of records still pending: see :meth:`write_result`), then the
        records' lines, then the delivery notes.
        """
        if self._pending_files:
            self._retry_files()
        if self._pending_figures:
            entries, self._pending_figures = self._pending_figures, []
            for entry in entries:
                self._file_figures(entry.record, entry.folder, entry.contents)
        try:
            if self.pending:
                _write_lines(self.path, [r.to_dict() for r in self.pending])
                self.pending = []
            if self._pending_deliveries:
                _write_lines(self.root / DELIVERIES_FILE, self._pending_deliveries)
                self._pending_deliveries = []
            if self._pending_notes:
                _write_lines(self.root / FIGURES_FILE, self._pending_notes)
                self._pending_notes = []
        except OSError as err:
            self._write_failed(
                err,
                f"{len(self.pending)} record(s), {len(self._pending_deliveries)} delivery note(s), "
                f"{len(self._pending_notes)} figure note(s)",
            )
            return False
        if self._write_error is not None:
            logger.warning("uma: the journal %s is writable again; what was pending is written", self.path)
            self._write_error = None
        return True

    def _write_failed(self, err: BaseException, what: str) -> None:
        if self._write_error is None:
            logger.warning(
                "uma: cannot write to %s (%s: %s); %s kept in memory, retried at the next write; training goes on",
                self.root,
                type(err).__name__,
                err,
                what,
            )
        self._write_error = f"{type(err).__name__}: {err}"

    # ------------------------------------------------------------------ reads
    def _refresh(self) -> None:
        restarted, payloads = self._log.read_new()
        notes_restarted, notes = self._notes.read_new()
        if notes_restarted:  # the notes were replaced: read the records again, with the notes as they are now
            self._figure_notes = {}
            if not restarted:
                self._log._reset()
                restarted, payloads = True, self._log.read_new()[1]
        if restarted:
            self._records, self._ok, self._by_id, self.foreign_lines, self._warned_bad = [], {}, {}, 0, 0
        for payload in notes:
            note = check_note(payload)
            if note is None:
                continue
            self._figure_notes.setdefault(note["id"], []).append(note)
            for record in self._by_id.get(note["id"], []):
                apply_note(record, note)
        for payload in payloads:
            try:
                record = Record.from_dict(payload)
            except (RecordSchemaError, ValueError, TypeError, OverflowError) as err:  # 10**400 is no float
                self.foreign_lines += 1
                logger.debug("uma: journal line skipped: %s", err)
                continue
            for note in self._figure_notes.get(record.record_id, []):
                apply_note(record, note)
            self._by_id.setdefault(record.record_id, []).append(record)
            self._records.append(record)
            if record.status in MEASURED and record.cache_key:
                self._ok[record.cache_key] = record
        self.bad_lines = self._log.damaged + int(self._log.torn_tail) + self.foreign_lines
        if self.bad_lines > self._warned_bad:
            logger.warning(
                "uma: %d damaged journal line(s) in %s were skipped (%d torn or altered, %d not a record)",
                self.bad_lines,
                self.path,
                self.bad_lines - self.foreign_lines,
                self.foreign_lines,
            )
            self._warned_bad = self.bad_lines

    def records(self) -> list[Record]:
        """Every intact record, in write order, then those pending (bad lines in :attr:`bad_lines`)."""
        self._refresh()
        return self._records + self.pending

    def lookup(self, key: str) -> Record | None:
        """The latest ``ok`` record under ``key``, if any (an index lookup, no re-read)."""
        for record in reversed(self.pending):
            if record.cache_key == key and record.status in MEASURED:
                return record
        self._refresh()
        return self._ok.get(key)

    def resolve_file(self, rel: Any) -> Path | None:
        """The file a record names, if it may be read: inside :attr:`root`, resolved, a file.

        Anything else (``/etc/passwd``, ``../x``, a symlink out of the folder, a missing
        file) gives None; a refused entry is noted in :attr:`refused_files` and warned about.
        """
        path = artifact_path(self.root, rel)
        if path is None:
            self.refused_files.append(str(rel))
            logger.warning("uma: journal file entry %r refused: not a file inside %s", rel, self.root)
        return path

    def load_result(self, record: Record) -> MetricResult:
        """The full :class:`MetricResult` of a record (JSON + npz + safetensors files).

        Only files inside the journal folder are read (:meth:`resolve_file`), and each is
        data from disk: a JSON file that is not bounded strict JSON or not a result's shape
        (:func:`result_from_json`) leaves the record's own scalars and meta; an ``.npz``
        that is not a zip of plain numeric arrays within :data:`MAX_ARRAY_BYTES`, or a
        ``.safetensors`` that does not load, adds nothing. Each such file is warned about
        and noted in :attr:`unreadable_files`; this never raises for what a file holds.
        """
        result = None
        for rel in record.files:
            if not str(rel).endswith(".json"):
                continue
            path = self.resolve_file(rel)
            if path is None:
                continue
            try:
                result = result_from_json(read_json(path))
            except (OSError, ValueError, KeyError, TypeError, OverflowError) as err:
                self._unreadable(path, err, "the record's scalars are used")
            break
        if result is None:
            result = MetricResult(name=record.metric, scalars=dict(record.scalars), meta=dict(record.meta))
        for rel in record.files:
            if not str(rel).endswith((".npz", ".safetensors")):
                continue
            path = self.resolve_file(rel)
            if path is None:
                continue
            try:
                if path.suffix == ".npz":
                    result.arrays.update(load_npz(path))
                else:
                    from safetensors.torch import load_file

                    tensors = load_file(str(path))
                    result.tensors.update(tensors)
            except Exception as err:  # noqa: BLE001 (safetensors and zipfile raise several types for damaged files)
                self._unreadable(path, err, "its arrays are left out")
        result.status, result.error = record.status, record.error
        return result

    def _unreadable(self, path: Path, err: BaseException, consequence: str) -> None:
        self.unreadable_files.append(str(path))
        logger.warning("uma: result file %s unreadable (%s: %.200s); %s", path, type(err).__name__, err, consequence)

    # ------------------------------------------------------------------ deliveries
    def mark_delivered(self, sink: str, run: str, record_id: str, uri: str = "") -> None:
        """Note that ``record_id`` reached ``(sink, run)`` (kept in memory if the write fails).

        ``uri`` is where that run lives (an MLflow tracking URI), so the offline tools find
        the very run the live training logged to, however it was opened.
        """
        self._delivered.setdefault((sink, run), set()).add(record_id)
        entry = {"sink": sink, "run": run, "id": record_id}
        if uri:
            entry["uri"] = uri
        self._pending_deliveries.append(entry)
        self.flush()

    def delivered(self, sink: str, run: str) -> set[str]:
        """Record ids already delivered to ``(sink, run)``."""
        restarted, payloads = self._deliveries.read_new()
        if restarted:
            self._delivered = {}
            for p in self._pending_deliveries:
                self._delivered.setdefault((p["sink"], p["run"]), set()).add(p["id"])
        for p in payloads:
            if isinstance(p, dict) and all(isinstance(p.get(k), str) for k in ("sink", "run", "id")):
                self._delivered.setdefault((p["sink"], p["run"]), set()).add(p["id"])
        return set(self._delivered.get((sink, run), set()))

    # ------------------------------------------------------------------ work splitting
    def claim(self, key: str) -> bool:
        """Try to take ``key`` for this process; False while another process holds it.

        A claim is an exclusive ``flock`` on ``claims/<key>.lock``, held until
        :meth:`release` or the process ends (the kernel drops it even after ``kill -9``).
        Two backfills of one run claim each key before computing it, and then look it up
        (the other may have finished it meanwhile): each result is computed once. Where
        the claim file cannot be created (disk full), the claim is granted (the work may
        then be done twice, never lost). Claiming a key this process holds is True.
        """
        if key in self._claims:
            return True
        folder = self.root / CLAIMS_DIR
        path = folder / f"{safe_name(key)}.lock"
        for _ in range(10):
            try:
                folder.mkdir(exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                logger.warning("uma: cannot create the claim %s (%s); computing without it", path, err)
                return True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._claims[key] = fd
                return True
            os.close(fd)  # the holder released (and removed) it between our open and lock: retry
        return False

    def release(self, key: str) -> None:
        """Give up a claim taken with :meth:`claim` (no-op when not held)."""
        fd = self._claims.pop(key, None)
        if fd is None:
            return
        try:
            (self.root / CLAIMS_DIR / f"{safe_name(key)}.lock").unlink(missing_ok=True)
        except OSError as err:
            logger.debug("uma: claim file of %s not removed (%s)", key, err)
        os.close(fd)


def _json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, +-Inf, in meta too) as ``None``: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _atomic_write_text(path: Path, text: str, tmp: Path | None = None) -> None:
    """Write ``text`` to ``path`` through a fresh temporary file (``tmp`` is ignored: kept for callers)."""
    write_atomically(path, text.encode("utf-8"))


@dataclass
class _PendingFiles:
    """Files of ``record`` that failed to write into ``folder`` (relative to the root), kept for a retry."""

    record: Record
    folder: str
    contents: dict[str, bytes]


def _result_json(result: MetricResult) -> bytes:
    return json.dumps(_json_safe(result.to_json_dict()), indent=1, allow_nan=False).encode("utf-8")


def _npz_bytes(arrays: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **{safe_name(k): np.asarray(v) for k, v in arrays.items()})
    return buffer.getvalue()


def _safetensors_bytes(tensors: dict[str, Any]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


#: The most bytes one array of a result's ``.npz`` may take once loaded.
MAX_ARRAY_BYTES = 2**30
#: The most arrays a result's ``.npz`` may hold.
MAX_NPZ_MEMBERS = 10_000


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a result's ``.npz``: plain numeric arrays only, each checked before it is read.

    Each member's ``.npy`` header is read first: an object (pickled) array, a structured
    dtype, or one of more than :data:`MAX_ARRAY_BYTES` once loaded is refused before
    its data is decompressed.

    Raises:
        ValueError: not a zip of ``.npy`` arrays, or an array refused as above.
        OSError: the file cannot be read.
        zipfile.BadZipFile: the file is damaged (not a zip archive).
        EOFError: the file is damaged (cut short).
    """  # noqa: DOC502 (OSError, BadZipFile, EOFError: from zipfile and numpy)
    import zipfile

    with zipfile.ZipFile(path) as archive:
        members = archive.infolist()
        if len(members) > MAX_NPZ_MEMBERS:
            raise ValueError(f"{path.name} holds {len(members)} members, more than {MAX_NPZ_MEMBERS}")
        for info in members:
            if not info.filename.endswith(".npy"):
                raise ValueError(f"{path.name} holds {info.filename!r}, not a .npy array")
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                if version == (1, 0):
                    shape, _fortran, dtype = np.lib.format.read_array_header_1_0(member)
                elif version == (2, 0):
                    shape, _fortran, dtype = np.lib.format.read_array_header_2_0(member)
                else:
                    raise ValueError(f"{path.name}: {info.filename} has npy format {version}")
            if dtype.hasobject or dtype.kind not in "biufc":
                raise ValueError(f"{path.name}: {info.filename} holds {dtype} values, not numbers")
            if math.prod(shape) * dtype.itemsize > MAX_ARRAY_BYTES:
                raise ValueError(f"{path.name}: {info.filename} would take more than {MAX_ARRAY_BYTES} bytes")
    with np.load(path, allow_pickle=False) as data:
        return {key: np.asarray(data[key]) for key in data.files}


def result_from_json(data: Any) -> MetricResult:
    """A :class:`MetricResult` from the content of a result's JSON file, every field checked.

    ``name`` a string; ``scalars`` an object of numbers or null; ``arrays`` an object of
    numeric (rectangular) lists; ``meta`` an object whose ``config``, when present, is an
    object; ``status`` a string; ``error`` null or an object of strings.

    Raises:
        ValueError: a field of another type or shape (named in the message).
    """
    if not isinstance(data, dict):
        raise ValueError(f"a result must be a JSON object; got {type(data).__name__}")
    name = data.get("name")
    if not isinstance(name, str):
        raise ValueError(f"result field 'name' must be a string; got {name!r:.60}")
    scalars = data.get("scalars", {})
    if not isinstance(scalars, dict) or not all(
        isinstance(k, str) and (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))) for k, v in scalars.items()
    ):
        raise ValueError(f"result field 'scalars' must be an object of numbers (or null); got {scalars!r:.60}")
    arrays = data.get("arrays", {})
    if not isinstance(arrays, dict) or not all(isinstance(k, str) for k in arrays):
        raise ValueError(f"result field 'arrays' must be an object of numeric lists; got {arrays!r:.60}")
    meta = data.get("meta", {})
    if not isinstance(meta, dict) or not isinstance(meta.get("config", {}), dict):
        raise ValueError(f"result field 'meta' must be an object (its 'config' an object); got {meta!r:.60}")
    status = data.get("status", "ok")
    error = data.get("error")
    if not isinstance(status, str) or not (error is None or (isinstance(error, dict) and all(isinstance(v, str) for v in error.values()))):
        raise ValueError("result fields 'status' (a string) and 'error' (null or an object of strings) are malformed")
    checked_arrays = {}
    for key, value in arrays.items():
        if isinstance(value, (dict, str, bool)):
            raise ValueError(f"result array {key!r} must be a numeric list; got {type(value).__name__}")
        checked_arrays[key] = np.asarray(value, dtype=np.float64)  # ValueError when ragged or not numbers
    return MetricResult(
        name=name,
        scalars={k: float(v) if v is not None else math.nan for k, v in scalars.items()},  # OverflowError: 10**400
        arrays=checked_arrays,
        meta=dict(meta),
        status=status,
        error=error,
    )

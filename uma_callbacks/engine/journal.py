"""The journal: the durable local record of every result, and the cache.

Layout under ``<output_dir>/uma/``::

    journal.jsonl                 one self-checking line per record
    deliveries.jsonl              one line per (sink, run, record id) delivered
    step-<N>/<metric>.json        the full result (scalars, arrays, meta)
    step-<N>/<metric>.npz         its arrays (numpy, ``allow_pickle=False`` on read)
    step-<N>/<metric>.safetensors its tensors (e.g. the Fisher diagonal), when kept
    step-<N>/<metric>-*.png       figures

Each journal line is ``{"sha": sha256(payload)[:16], "record": payload}``; a line whose
checksum does not match (a torn write after ``kill -9``) is skipped on read and counted
in :attr:`Journal.bad_lines`. Lines are appended with one ``os.write`` on an
``O_APPEND`` descriptor and ``fsync``-ed: a reader sees whole lines or a torn last one.

The cache key is sha256 of (checkpoint fingerprint, metric config, probe fingerprint):
a journalled ``ok`` record under the same key is a cache hit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from uma_callbacks.metrics.base import MetricResult
from uma_callbacks.engine.records import Record

logger = logging.getLogger(__name__)

JOURNAL_FILE = "journal.jsonl"
DELIVERIES_FILE = "deliveries.jsonl"
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


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


def _parse_line(line: str) -> dict[str, Any] | None:
    try:
        outer = json.loads(line)
        payload = outer["record"]
        body = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (ValueError, KeyError, TypeError):
        return None
    if hashlib.sha256(body.encode()).hexdigest()[:16] != outer.get("sha"):
        return None
    return payload


def append_line(path: Path, payload: dict[str, Any]) -> None:
    """Append one self-checking JSON line atomically (one write, O_APPEND, fsync)."""
    data = _checked_line(payload)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data  # a torn last line (kill -9 mid-write) stays on a line of its own
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_lines(path: Path) -> tuple[list[dict[str, Any]], int]:
    """``(payloads, n_bad)``: every intact line of a journal file, and how many were not."""
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


class Journal:
    """Durable record + cache under ``root`` (usually ``<output_dir>/uma``).

    Args:
        root: the folder (created).
        save_tensors: write ``result.tensors`` as ``.safetensors`` files.
    """

    def __init__(self, root: str | os.PathLike[str], save_tensors: bool = False) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.save_tensors = save_tensors
        self.bad_lines = 0

    @property
    def path(self) -> Path:
        """The journal file."""
        return self.root / JOURNAL_FILE

    # ------------------------------------------------------------------ writes
    def write_files(self, result: MetricResult, step: int) -> list[str]:
        """Write the result's JSON, npz and safetensors under ``step-<N>/``; relative paths."""
        folder = self.root / f"step-{int(step)}"
        folder.mkdir(parents=True, exist_ok=True)
        base = safe_name(result.name)
        files = []
        json_path = folder / f"{base}.json"
        _atomic_write_text(json_path, json.dumps(result.to_json_dict(), indent=1, allow_nan=False))
        files.append(json_path)
        if result.arrays:
            npz_path = folder / f"{base}.npz"
            tmp = npz_path.with_name(npz_path.name + ".tmp.npz")
            np.savez(tmp, **{safe_name(k): np.asarray(v) for k, v in result.arrays.items()})
            os.replace(tmp, npz_path)
            files.append(npz_path)
        if self.save_tensors and result.tensors:
            from safetensors.torch import save_file

            st_path = folder / f"{base}.safetensors"
            tmp = st_path.with_name(st_path.name + ".tmp")
            save_file({k: v.detach().cpu().contiguous() for k, v in result.tensors.items()}, str(tmp))
            os.replace(tmp, st_path)
            files.append(st_path)
        return [self._relative(p) for p in files]

    def add_files(self, paths: Iterable[Path]) -> list[str]:
        """Relative paths of extra files (figures) already written under the root."""
        return [self._relative(Path(p)) for p in paths]

    def _relative(self, path: Path) -> str:
        resolved = path.resolve()
        root = self.root.resolve()
        if root not in resolved.parents:
            raise ValueError(f"artifact path {path} escapes the journal folder {self.root}")
        return resolved.relative_to(root).as_posix()

    def append(self, record: Record) -> None:
        """Append a record line."""
        append_line(self.path, record.to_dict())

    # ------------------------------------------------------------------ reads
    def records(self) -> list[Record]:
        """Every intact record, in write order (torn lines counted in :attr:`bad_lines`)."""
        payloads, self.bad_lines = read_lines(self.path)
        if self.bad_lines:
            logger.warning("uma: %d damaged journal line(s) in %s were skipped", self.bad_lines, self.path)
        return [Record.from_dict(p) for p in payloads]

    def lookup(self, key: str) -> Record | None:
        """The latest ``ok`` record under ``key``, if any."""
        found = None
        for record in self.records():
            if record.cache_key == key and record.status == "ok":
                found = record
        return found

    def load_result(self, record: Record) -> MetricResult:
        """The full :class:`MetricResult` of a record (JSON + npz + safetensors files)."""
        json_files = [f for f in record.files if f.endswith(".json")]
        if json_files:
            data = json.loads((self.root / json_files[0]).read_text())
            result = MetricResult.from_json_dict(data)
        else:
            result = MetricResult(name=record.metric, scalars=dict(record.scalars), meta=dict(record.meta))
        for rel in record.files:
            path = self.root / rel
            if rel.endswith(".npz") and path.exists():
                with np.load(path, allow_pickle=False) as data:
                    result.arrays.update({k: data[k] for k in data.files})
            elif rel.endswith(".safetensors") and path.exists():
                from safetensors.torch import load_file

                result.tensors.update(load_file(str(path)))
        result.status, result.error = record.status, record.error
        return result

    # ------------------------------------------------------------------ deliveries
    def mark_delivered(self, sink: str, run: str, record_id: str) -> None:
        """Note that ``record_id`` reached ``(sink, run)``."""
        append_line(self.root / DELIVERIES_FILE, {"sink": sink, "run": run, "id": record_id})

    def delivered(self, sink: str, run: str) -> set[str]:
        """Record ids already delivered to ``(sink, run)``."""
        payloads, _ = read_lines(self.root / DELIVERIES_FILE)
        return {p["id"] for p in payloads if p.get("sink") == sink and p.get("run") == run}


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)

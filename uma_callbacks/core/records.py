"""The record: what the journal stores and the sinks receive (in ``core``: engine and sinks both import it).

A :class:`Record` is one metric's outcome at one step, in JSON form. Its log keys are
``uma/<metric>/<scalar>`` (DESIGN.md's logging contract), plus ``uma/<metric>/seconds``
and ``uma/<metric>/peak_mb`` from its meta.

Records read from disk are data from anywhere (another version, another tool, a hand
edit): :meth:`Record.from_dict` checks every field's type against :data:`SCHEMA` and
raises :class:`RecordSchemaError` on anything else, and :func:`artifact_path` is the
only way from a record's ``files`` entry to a file: inside the journal root, resolved
(symlinks too), or refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: The prefix of every logged key.
PREFIX = "uma"
#: Every status a record may carry.
STATUSES = ("ok", "error", "skipped", "timeout", "cached", "interrupted", "partial")
#: Statuses whose record carries measured values (``partial``: kept, but an iterative method
#: did not reach its stated accuracy; flagged on the dashboard).
MEASURED = ("ok", "partial")
#: Statuses whose values are logged (measured now, or read from the cache).
VALUED = ("ok", "partial", "cached")


class RecordSchemaError(ValueError):
    """A record read from disk does not have the record's shape (field, expected type, got)."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number_or_null(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _is_str_dict(v: Any, values: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and values(x) for k, x in v.items())


def _is_file_identity(v: Any) -> bool:
    return (
        isinstance(v, dict)
        and _is_int(v.get("size"))
        and v["size"] >= 0
        and isinstance(v.get("sha256"), str)
        and len(v["sha256"]) == 64
        and all(c in "0123456789abcdef" for c in v["sha256"])
    )


#: ``{field: (required, check, what is expected)}``: the record schema, checked on read.
SCHEMA: dict[str, tuple[bool, Any, str]] = {
    "step": (True, lambda v: _is_int(v) and -(2**63) <= v < 2**63, "a 64-bit integer"),
    "metric": (True, lambda v: isinstance(v, str), "a string"),
    "status": (True, lambda v: v in STATUSES, f"one of {STATUSES}"),
    "scalars": (False, lambda v: _is_str_dict(v, _is_number_or_null), "an object of numbers (or null)"),
    "meta": (False, lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v), "an object"),
    "error": (False, lambda v: v is None or _is_str_dict(v, lambda x: isinstance(x, str)), "null or an object of strings"),
    "files": (False, lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "cache_key": (False, lambda v: isinstance(v, str), "a string"),
    "checkpoint": (False, lambda v: isinstance(v, str), "a string"),
    "probe": (False, lambda v: isinstance(v, str), "a string"),
    "source": (False, lambda v: isinstance(v, str), "a string"),
    "file_ids": (False, lambda v: _is_str_dict(v, _is_file_identity), "an object of {size, sha256} objects"),
    "missing_files": (False, lambda v: _is_str_dict(v, lambda x: isinstance(x, str)), "an object of strings"),
    "run": (False, lambda v: isinstance(v, str) and len(v) <= 64, "a string of at most 64 characters"),
}


def check_record_dict(data: Any) -> None:
    """Raise :class:`RecordSchemaError` unless ``data`` has the shape of :meth:`Record.to_dict`.

    Unknown extra fields are allowed (a newer version may add some) and ignored.

    Raises:
        RecordSchemaError: not an object, a required field missing, or a field of the wrong type.
    """
    if not isinstance(data, dict):
        raise RecordSchemaError(f"a record must be a JSON object; got {type(data).__name__}")
    for name, (required, check, expected) in SCHEMA.items():
        if name not in data:
            if required:
                raise RecordSchemaError(f"record field {name!r} is missing")
            continue
        if not check(data[name]):
            raise RecordSchemaError(f"record field {name!r} must be {expected}; got {data[name]!r:.80}")


def artifact_path(root: str | os.PathLike[str], rel: Any, identity: Any = None) -> Path | None:
    """The file a record's ``files`` entry names, or None when it may not be read.

    Only regular files inside ``root`` may be read or uploaded: ``rel`` must be a
    relative string path and ``(root / rel).resolve()`` (symlinks followed) must lie
    inside ``root.resolve()``. ``/etc/passwd``, ``../../x`` and a symlink pointing out of
    the folder give None, as does a missing file. So does a file with more than one hard
    link (a name inside the folder for a file that also lives elsewhere), and, when
    ``identity`` is given (the record's ``file_ids`` entry: ``{"size", "sha256"}`` of what
    the journal wrote), a file whose size or content differs from it.

    Example:
        >>> artifact_path("/tmp", "/etc/passwd") is None
        True
    """
    if not isinstance(rel, str) or not rel or "\x00" in rel or os.path.isabs(rel):
        return None
    base = Path(root).resolve()
    try:
        path = (base / rel).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return None
    if base not in path.parents or not path.is_file():
        return None
    try:
        st = path.stat()
        if st.st_nlink > 1:
            return None
        if identity is not None and not _same_content(path, st.st_size, identity):
            return None
    except OSError:
        return None
    return path


def _same_content(path: Path, size: int, identity: Any) -> bool:
    """Whether ``path`` (of ``size`` bytes) holds what ``identity`` (``{"size", "sha256"}``) describes."""
    if not _is_file_identity(identity) or size != identity["size"]:
        return False
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest() == identity["sha256"]


def log_key(metric: str, scalar: str) -> str:
    """``uma/<metric>/<scalar>``."""
    return f"{PREFIX}/{metric}/{scalar}"


@dataclass
class Record:
    """One metric's outcome at one step.

    Attributes:
        step: the checkpoint's global step (the x-axis everywhere).
        metric: the metric's string name.
        status: ``ok``, ``error``, ``skipped``, ``timeout`` or ``cached``.
        scalars: ``{scalar name: value}`` without the ``uma/<metric>/`` prefix.
        meta: seconds, peak_bytes, chunk_size, config, ...
        error: ``{"type", "message", "traceback"}`` when not ok.
        files: artifact paths relative to the journal root (JSON, npz, PNG, safetensors).
        cache_key: identifies (checkpoint fingerprint, metric config, probe fingerprint).
        checkpoint: the checkpoint fingerprint (or folder name).
        probe: the probe fingerprint.
        source: what produced it: ``callback``, ``accelerate``, ``backfill``, ``analyze``.
        file_ids: ``{files entry: {"size", "sha256"}}`` of each file as the journal wrote
            it (absent in records of older versions); uploads send only matching files.
        missing_files: ``{relative path: why}`` for files of the result that were not
            written (a refused symbolic link, a full disk).
        run: the id of the training run that made it
            (:mod:`~uma_callbacks.engine.run_identity`); ``""`` in records of older versions.
    """

    step: int
    metric: str
    status: str
    scalars: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    error: dict[str, str] | None = None
    files: list[str] = field(default_factory=list)
    cache_key: str = ""
    checkpoint: str = ""
    probe: str = ""
    source: str = ""
    file_ids: dict[str, dict[str, Any]] = field(default_factory=dict)
    missing_files: dict[str, str] = field(default_factory=dict)
    run: str = ""

    @property
    def record_id(self) -> str:
        """Stable id of (step, metric, cache key, run): a sink delivers each id once.

        A record without a run (an older version's) keeps the id it had then, so the
        deliveries noted by that version still count.
        """
        run = f"|{self.run}" if self.run else ""
        return hashlib.sha256(f"{self.step}|{self.metric}|{self.cache_key}{run}".encode()).hexdigest()[:24]

    def log_values(self) -> dict[str, float]:
        """``{uma/<metric>/<scalar>: value}`` for the finite scalars, with seconds and peak_mb."""
        out = {log_key(self.metric, k): float(v) for k, v in self.scalars.items() if _finite(v)}
        if self.status in MEASURED and _finite(self.meta.get("seconds")):
            out[log_key(self.metric, "seconds")] = float(self.meta["seconds"])
        if self.status in MEASURED and _finite(self.meta.get("peak_bytes")):
            out[log_key(self.metric, "peak_mb")] = float(self.meta["peak_bytes"]) / 2**20
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (non-finite scalars become ``None``)."""
        data = asdict(self)
        for name in ("file_ids", "missing_files"):  # absent when empty: lines as older versions wrote them
            if not data[name]:
                del data[name]
        data["scalars"] = {k: (float(v) if _finite(v) else None) for k, v in self.scalars.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        """Inverse of :meth:`to_dict` (``None`` scalars read back as NaN), checked against :data:`SCHEMA`.

        Raises:
            RecordSchemaError: ``data`` does not have a record's shape (see :func:`check_record_dict`).
        """  # noqa: DOC502 (from check_record_dict)
        check_record_dict(data)
        kwargs = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        kwargs["scalars"] = {k: (math.nan if v is None else float(v)) for k, v in data.get("scalars", {}).items()}
        return cls(**kwargs)

    def to_json(self) -> str:
        """Compact, key-sorted JSON."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def config_of(record: Any) -> dict[str, Any] | None:
    """The configuration a record was asked for: ``meta["config"]`` with the budget's scaling undone.

    Under a compute budget a save may run a metric scaled down (fewer probes); its
    ``meta["compute_budget"]["scaled"]`` holds ``{knob: [asked, ran]}``, and the asked value
    is put back, so one configured metric stays one series across saves. None when the
    record names no configuration (a record of an older version or of another tool).
    """
    meta = record.meta if isinstance(record.meta, dict) else {}
    config = meta.get("config")
    if not isinstance(config, dict):
        return None
    config = dict(config)
    budget = meta.get("compute_budget")
    scaled = budget.get("scaled") if isinstance(budget, dict) else None
    if isinstance(scaled, dict):
        for knob, change in scaled.items():
            if knob in config and isinstance(change, (list, tuple)) and len(change) == 2:
                config[knob] = change[0]
    return config


def config_identity(config: Any) -> str:
    """A short hash of a configuration (``""`` for none), as the suite names a variant folder."""
    if not config:
        return ""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:8]

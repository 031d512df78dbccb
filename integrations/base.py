"""The sink protocol: what a tracker integration implements.

A sink receives :class:`~uma_callbacks.core.records.Record` objects (already journalled) and
the journal root for their files. The engine calls, on world rank 0 only:

1. :meth:`Sink.start` -- open or join the run; called before every delivery, so it must
   be cheap once started (and may raise: the record stays pending in the journal);
2. :meth:`Sink.run_id` -- with :attr:`Sink.name`, the key of the journal's delivery log:
   a record already delivered to ``(name, run_id)`` is never sent again;
3. :meth:`Sink.log_params` -- once per run: metric configs, probe fingerprint;
4. :meth:`Sink.log_record` -- one record: ``record.log_values()`` at ``record.step`` (the
   checkpoint's global step, never the tracker's own counter), its files
   (``root / f`` for ``f`` in ``record.files``), and its error when
   ``record.status`` is not ``ok``/``cached``;
5. :meth:`Sink.finish` -- only for runs the sink opened itself.

Rules: never raise for a record you already hold (idempotent per (run, step, key):
delivering the same record twice adds no points -- the delivery log covers replays
across processes, keep a set for the ones within a process); import your tracker's
package inside the sink, not at module level; anything that raises is reported once as a
warning and retried at the next delivery, training goes on.

To plug in your own tracker, subclass :class:`Sink` and pass an instance in
``UMACallback(trackers=[MySink()])`` or ``attach(accelerator, trackers=[MySink()])``::

    class PrintSink(Sink):
        name = "print"

        def log_record(self, record, root):
            print(record.step, record.log_values())

Any object with ``name``, ``start``, ``run_id``, ``log_record``, ``log_params`` and
``finish`` works (duck typing); subclassing gives the no-op defaults.

Helpers every sink here uses:

- :func:`tracker_key`: the key a tracker receives for a ``uma/...`` key (stable,
  documented, collision-free; see its docstring);
- :func:`rng_preserved`: trackers draw from Python's ``random`` (MLflow's run names,
  W&B ids) and may touch NumPy's or torch's global RNG; every public sink method here
  runs inside it, so a training run's data order and dropout never depend on a tracker;
- :func:`~uma_callbacks.core.records.artifact_path`: a record's ``files`` entry is
  uploaded only if it is a file inside the journal root (resolved, symlinks too);
- :func:`artifact_folder`: the folder a file keeps in the tracker, ``step-N`` or the
  variant folder under it (``step-N/fisher-<config hash>``, ``step-N/fisher-run-<run>``),
  so a backfill with another config never replaces the live run's files;
- :func:`param_key`: the key a param is logged under, the same value never twice and a
  changed value (a backfill's other config) under a key of its own, never over the first.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import json
import logging
import posixpath
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from uma_callbacks.core.records import Record, artifact_path
from uma_callbacks.core.rng import rng_preserved  # noqa: F401 (part of the sink API)

logger = logging.getLogger(__name__)

_F = TypeVar("_F", bound=Callable[..., Any])
#: Characters every tracker accepts in a key (MLflow on any OS, W&B).
_KEY_OK = re.compile(r"[^A-Za-z0-9_./ -]")
#: MLflow's limit on a metric, param or tag key.
KEY_MAX = 250


def tracker_key(key: str) -> str:
    """The key a tracker gets for ``key``: unchanged when valid everywhere, else a safe, unique form.

    Valid keys use only ``A-Z a-z 0-9 _ . / - space``, are at most :data:`KEY_MAX`
    characters, and are clean paths (no leading or trailing ``/``, no ``//``, no ``.`` or
    ``..`` component: MLflow treats names as paths). Those are returned as they are, so
    dashboards keep their keys. Any other key has each character outside that set replaced
    by ``_``, the path cleaned, and ``-`` plus the first 10 hex digits of sha256(original
    key) appended (the whole cut to :data:`KEY_MAX`): stable across processes and
    versions, and two different keys never meet (a valid key cannot end in the hash of
    another key short of a 40-bit hash collision).

    Example:
        >>> tracker_key("uma/gradient_flow/total_norm")
        'uma/gradient_flow/total_norm'
        >>> tracker_key("uma/gradient_flow/params/heads.c++.weight/norm")
        'uma/gradient_flow/params/heads.c__.weight/norm-30f3c5aa80'
    """
    if _valid_key(key):
        return key
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    parts = [p for p in _KEY_OK.sub("_", key).split("/") if p not in ("", ".", "..")]
    cleaned = "/".join(parts) or "key"
    return f"{cleaned[: KEY_MAX - 11]}-{digest}"


def _valid_key(key: str) -> bool:
    return (
        isinstance(key, str)
        and 0 < len(key) <= KEY_MAX
        and not _KEY_OK.search(key)
        and posixpath.normpath(key) == key
        and not key.startswith(("/", ".."))
        and key != "."
    )


def keeps_rng(method: _F) -> _F:
    """Decorator: run ``method`` inside :func:`rng_preserved`."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with rng_preserved():
            return method(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def uploadable_files(root: Path, record: Record, refused: set[str] | None = None) -> list[Path]:
    """The record's files that may be uploaded (:func:`artifact_path`); the others are warned about once.

    A record that notes what the journal wrote (``file_ids``) has only those files
    uploaded, each only while its size and sha256 still match; any record's file with more
    than one hard link is refused.
    """
    out = []
    ids = getattr(record, "file_ids", None) or {}
    for rel in record.files:
        path = None if ids and rel not in ids else artifact_path(root, rel, ids.get(rel) if ids else None)
        if path is None:
            if refused is None or rel not in refused:
                logger.warning(
                    "uma: file %r of %s at step %s refused: not a file inside %s, a hard link, or not what the journal wrote",
                    rel, record.metric, record.step, root,
                )  # fmt: skip
            if refused is not None:
                refused.add(rel)
            continue
        out.append(path)
    return out


def artifact_folder(root: Path, path: Path) -> str:
    """The folder, relative to the journal ``root``, of ``path`` (one of :func:`uploadable_files`).

    ``step-40`` for the live run's files, ``step-40/fisher-1a2b3c4d`` for another config's
    (a backfill), ``step-40/fisher-run-<run>`` for a second training's: sinks upload each
    file under ``uma/<this folder>``, so variants never replace the live files.

    Example:
        >>> artifact_folder(Path("/j"), Path("/j/step-40/fisher-1a2b3c4d/fisher.json"))
        'step-40/fisher-1a2b3c4d'
    """
    base = Path(root).resolve()
    try:
        rel = Path(path).relative_to(base)
    except ValueError:  # a path given unresolved
        rel = Path(path).resolve().relative_to(base)
    return rel.parent.as_posix()


def value_hash(value: Any) -> str:
    """8 hex digits of sha256 of ``value`` as sorted JSON: for a metric's config, the hash of its variant folder and keys."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:8]


def variant_param_key(key: str, digest: str) -> str:
    """``key`` for another value: ``uma.fisher.config`` -> ``uma.fisher-<digest>.config`` (as the scalars' ``uma/fisher-<digest>/``).

    A key without a group (``uma.probe_fingerprint``) gets the digest at its end.

    Example:
        >>> variant_param_key("uma.fisher.config", "1a2b3c4d")
        'uma.fisher-1a2b3c4d.config'
        >>> variant_param_key("uma.probe_fingerprint", "1a2b3c4d")
        'uma.probe_fingerprint-1a2b3c4d'
    """
    head, dot, field = key.rpartition(".")
    if dot and head and "." in head:
        return tracker_key(f"{head}-{digest}.{field}")
    return tracker_key(f"{key}-{digest}")


def param_key(key: str, text: str, value: Any, held: Mapping[str, Any]) -> str | None:
    """Where a param goes in a run that holds ``held``: ``key``, a variant key, or ``None`` (held already).

    Trackers keep a param's first value (MLflow refuses a change). So a value equal to the
    one held is not logged again, and another value (a backfill's other config) is logged
    under :func:`variant_param_key` with :func:`value_hash` of ``value``: each config's
    params once, both kept.

    Args:
        key: the tracker key (``uma.fisher.config``).
        text: the value as the tracker stores it (a string, cut to its limit).
        value: the value itself (hashed for the variant key).
        held: ``{key: stored value}`` the run holds.

    Returns:
        The key to log ``text`` under, or ``None`` when the run holds it already.

    Example:
        >>> param_key("uma.fisher.config", "{'top_k': 2}", {"top_k": 2}, {"uma.fisher.config": "{'top_k': 10}"})
        'uma.fisher-b606f2e4.config'
    """
    if key not in held:
        return key
    if str(held[key]) == text:
        return None
    other = variant_param_key(key, value_hash(value))
    if other in held and str(held[other]) == text:
        return None
    return other


#: Tracker name -> (importable package, pip extra).
TRACKER_PACKAGES: dict[str, tuple[str, str]] = {"mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}


def require_tracker(name: str) -> None:
    """Fail fast, without importing it, when a tracker's package is missing.

    Args:
        name: a key of :data:`TRACKER_PACKAGES`.

    Raises:
        ValueError: unknown tracker name, listing the known ones.
        ModuleNotFoundError: the package is not installed (names the pip extra).
    """
    import importlib.util  # noqa: PLC0415

    if name not in TRACKER_PACKAGES:
        raise ValueError(f"trackers entries must be one of {tuple(TRACKER_PACKAGES)!r}; got {name!r}")
    package, extra = TRACKER_PACKAGES[name]
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # a broken or blocked module (sys.modules entry None)
        spec = None
    if spec is None:
        raise ModuleNotFoundError(
            f"the {name!r} tracker needs the {package} package: pip install 'uma-callbacks[{extra}]'"
        )


class Sink(abc.ABC):
    """A destination for records (W&B, MLflow, your own).

    Attributes:
        name: short identifier (``"mlflow"``, ``"wandb"``); used in the journal's
            delivery log together with :meth:`run_id`.
    """

    name: str = ""

    def __init__(self) -> None:
        if not type(self).name:
            raise NotImplementedError(f"{type(self).__name__} must set the class attribute 'name'")

    def start(self) -> None:  # noqa: B027 (an optional hook: a no-op unless a sink needs it)
        """Open or join the run (called once, before the first record; may be a no-op)."""

    def run_id(self) -> str:
        """The run records go to (with :attr:`name`, the key of the delivery log)."""
        return ""

    @abc.abstractmethod
    def log_record(self, record: Record, root: Path) -> None:
        """Deliver one record: scalars at ``record.step``, its files, and error tags.

        Files are relative to ``root``; error tags are set when ``record.status`` is not ok.
        """

    def log_params(self, params: dict[str, Any]) -> None:  # noqa: B027 (an optional hook: a no-op unless a sink needs it)
        """Record configuration (metric configs, probe fingerprint) once per run."""

    def finish(self) -> None:  # noqa: B027 (an optional hook: a no-op unless a sink needs it)
        """Flush and release (called at the end of training or of a backfill)."""


class MemorySink(Sink):
    """Keeps records in a list: the test double for the suite and the journal."""

    name = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.records: list[Record] = []
        self.params: dict[str, Any] = {}

    def run_id(self) -> str:
        """Always ``"memory"``: one run per sink."""
        return "memory"

    def log_record(self, record: Record, root: Path) -> None:
        """Keep ``record`` in :attr:`records` (files are not read)."""
        self.records.append(record)

    def log_params(self, params: dict[str, Any]) -> None:
        """Merge ``params`` into :attr:`params`."""
        self.params.update(params)

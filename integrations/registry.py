"""The sink registry: tracker name -> sink class, and the one resolver every trigger uses.

Like Accelerate's tracker registry, a name maps to a class; the built-in trackers are
registered lazily (their module, hence their package, is imported only when the name is
used). Register your own with :func:`register_sink`, then name it anywhere a tracker name
is accepted (``UMACallback(trackers=["mine"])``, ``attach``, ``uma backfill --trackers``)::

    from uma_callbacks.integrations import Sink, register_sink

    class CSVSink(Sink):
        name = "csv"
        def log_record(self, record, root): ...

    register_sink("csv", CSVSink)

A registered class is built as ``cls(**options)`` where the options are what the trigger
knows, in one vocabulary for every tracker: ``fallback_dir`` (the journal folder, for a local
store or run files), ``run_id`` and ``tracking_uri`` (a tracker run to join); options its
constructor does not take are left out, and a class that takes none of them is built without
arguments.

:func:`resolve_sinks` is the one resolver of the sinks a session logs to (the session calls
it; the triggers only say what their default is).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from uma_callbacks.integrations.bounded import bounded_pair

logger = logging.getLogger(__name__)

#: Built-in trackers: name -> "module:Class", imported on first use.
_BUILTIN = {
    "mlflow": "uma_callbacks.integrations.mlflow:MLflowSink",
    "wandb": "uma_callbacks.integrations.wandb:WandbSink",
    "tensorboard": "uma_callbacks.integrations.tensorboard:TensorBoardSink",
}
#: Built-in trackers: name -> (importable package, pip extra), checked without importing it.
_PACKAGES = {"mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb"), "tensorboard": ("tensorboard", "tensorboard")}
_REGISTERED: dict[str, type | Callable[..., Any]] = {}


def tracker_names() -> tuple[str, ...]:
    """Every name a ``trackers=[...]`` entry may take (built-in first, then registered)."""
    return tuple(dict.fromkeys([*_BUILTIN, *_REGISTERED]))


def register_sink(name: str, factory: type | Callable[..., Any]) -> None:
    """Make ``name`` a tracker name built by ``factory`` (a :class:`Sink` subclass or a callable).

    Raises:
        ValueError: ``name`` is empty or not a string, or ``factory`` is not callable.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_sink: name must be a non-empty string; got {name!r}")
    if not callable(factory):
        raise ValueError(f"register_sink: factory must be a Sink class or a callable; got {factory!r}")
    _REGISTERED[name] = factory


def sink_class(name: str) -> type | Callable[..., Any]:
    """The class (or factory) registered under ``name``.

    Raises:
        ValueError: unknown name, listing the known ones.
        ModuleNotFoundError: a built-in tracker whose package is missing (names the pip extra).
    """  # noqa: DOC502 (ModuleNotFoundError: from _require_package)
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in _BUILTIN:
        raise ValueError(f"trackers entries must be sink objects or one of {tracker_names()!r}; got {name!r}")
    _require_package(name)
    module, attr = _BUILTIN[name].split(":")
    return getattr(importlib.import_module(module), attr)


def _require_package(name: str) -> None:
    """Fail fast, without importing it, when a built-in tracker's package is missing.

    Raises:
        ModuleNotFoundError: the package is not installed (names the pip extra).
    """
    import importlib.util  # noqa: PLC0415

    package, extra = _PACKAGES[name]
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # a broken or blocked module (sys.modules entry None)
        spec = None
    if spec is None:
        raise ModuleNotFoundError(f"the {name!r} tracker needs the {package} package: pip install 'uma-callbacks[{extra}]'")


def check_tracker(name: str) -> None:
    """Fail fast (at construction) on an unknown name or a built-in tracker's missing package.

    Raises:
        ValueError: unknown name.
        ModuleNotFoundError: missing package (names the pip extra).
    """  # noqa: DOC502 (ModuleNotFoundError: from _require_package)
    if name in _REGISTERED:
        return
    if name not in _BUILTIN:
        raise ValueError(f"trackers entries must be sink objects or one of {tracker_names()!r}; got {name!r}")
    _require_package(name)


def make_sink(name: str, **options: Any) -> Any:
    """Build the sink registered as ``name`` with the options its constructor accepts.

    Args:
        name: a tracker name (:func:`tracker_names`).
        **options: ``fallback_dir`` (journal folder), ``run_id``, ``tracking_uri``, ...;
            options the constructor does not take are left out.

    Raises:
        ValueError: unknown name.
        ModuleNotFoundError: the tracker's package is missing (names the pip extra).
    """  # noqa: DOC502 (from sink_class)
    factory = sink_class(name)
    params: Mapping[str, inspect.Parameter]
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature: no options
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = {k: v for k, v in options.items() if v is not None and (takes_any or k in params)}
    return factory(**accepted)


def resolve_sinks(
    requested: Sequence[Any] | None,
    *,
    default: Sequence[Any] = (),
    runs: Mapping[str, Mapping[str, str]] | None = None,
    capture: bool = True,
    tracker_timeout: float | None = None,
    **options: Any,
) -> tuple[list[Any], list[Any]]:
    """The sinks a session logs to, and those among them whose runs it opened itself.

    Each entry is one of:

    - a sink object (it has ``log_record``): used as it is; the user finishes it;
    - an Accelerate tracker (an accelerator's ``trackers`` entry): joined by our sink
      (:func:`~uma_callbacks.integrations.accelerate.sink_for_tracker`); the accelerator
      finishes its run;
    - a tracker name: built by :func:`make_sink`. With ``capture``, a run the tracker already
      has open in this process (the Trainer's ``report_to`` callback opened it) is joined and
      left to its owner; else the run ``runs[name]`` names (``{"run", "uri"}``: a resumed
      training's, or the one a journal last delivered to) is joined, else a new run is
      opened; both are ours to finish.

    Args:
        requested: ``None`` (use ``default``), or entries (``UMAConfig.trackers``).
        default: what ``None`` means for this trigger (the Trainer's ``report_to`` names,
            the accelerator's trackers, the names a backfill was given runs for).
        runs: ``{tracker name: {"run", "uri"}}``, the tracker runs names join.
        capture: join a run the tracker has open in this process (live training only).
        tracker_timeout: seconds each tracker call may take
            (:class:`~uma_callbacks.integrations.bounded.BoundedSink`; the live triggers pass
            ``UMAConfig.tracker_timeout_seconds``); ``None``: unbounded.
        **options: passed to :func:`make_sink` for names (``fallback_dir``).

    Returns:
        ``(sinks, own)``: every sink, and the ones built here that did not join an
        already open run (the session finishes those at the end).

    Raises:
        ValueError: an unknown name.
        ModuleNotFoundError: a named tracker's package is missing.
    """  # noqa: DOC502 (from make_sink)
    entries = list(default if requested is None else requested)
    sinks: list[Any] = []
    own: list[Any] = []
    for entry in entries:
        if not isinstance(entry, str):
            if callable(getattr(entry, "log_record", None)):
                sinks.append(entry)
            else:
                from uma_callbacks.integrations.accelerate import sink_for_tracker  # noqa: PLC0415

                sinks.append(sink_for_tracker(entry))
            continue
        where = dict((runs or {}).get(entry) or {})
        if capture:
            sink = make_sink(entry, **options)
            grab = getattr(sink, "capture_active_run", None)
            if callable(grab) and grab():
                if where.get("run") and sink.run_id() != where["run"]:
                    logger.warning(
                        "uma: %s run %s is open in this process, the journal's run was %s: logging to the open one",
                        entry, sink.run_id(), where["run"],
                    )  # fmt: skip
                sinks.append(sink)
                continue
            if where.get("run") or where.get("uri"):
                sink = make_sink(entry, run_id=where.get("run") or None, tracking_uri=where.get("uri") or None, **options)
        else:
            sink = make_sink(entry, run_id=where.get("run") or None, tracking_uri=where.get("uri") or None, **options)
        sinks.append(sink)
        own.append(sink)
    return bounded_pair(sinks, own, tracker_timeout)


def env_tracking_uri() -> str | None:
    """``MLFLOW_TRACKING_URI`` when set (what a run opened through it used)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or None

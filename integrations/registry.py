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
knows (``fallback_dir``: the journal folder, for a local store); a class that takes none
of them is built without arguments.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable, Sequence
from typing import Any

from uma_callbacks.integrations.bounded import bounded_pair

#: Built-in trackers: name -> "module:Class", imported on first use.
_BUILTIN = {
    "mlflow": "uma_callbacks.integrations.mlflow:MLflowSink",
    "wandb": "uma_callbacks.integrations.wandb:WandbSink",
}
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
    """
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in _BUILTIN:
        raise ValueError(f"trackers entries must be sink objects or one of {tracker_names()!r}; got {name!r}")
    from uma_callbacks.integrations.base import require_tracker

    require_tracker(name)
    module, attr = _BUILTIN[name].split(":")
    return getattr(importlib.import_module(module), attr)


def check_tracker(name: str) -> None:
    """Fail fast (at construction) on an unknown name or a built-in tracker's missing package.

    Raises:
        ValueError: unknown name.
        ModuleNotFoundError: missing package (names the pip extra).
    """
    if name in _REGISTERED:
        return
    if name not in _BUILTIN:
        raise ValueError(f"trackers entries must be sink objects or one of {tracker_names()!r}; got {name!r}")
    from uma_callbacks.integrations.base import require_tracker

    require_tracker(name)


def make_sink(name: str, **options: Any) -> Any:
    """Build the sink registered as ``name`` with the options its constructor accepts.

    Args:
        name: a tracker name (:func:`tracker_names`).
        **options: ``fallback_dir`` (journal folder), ``run_id``, ``tracking_uri``, ...;
            options the constructor does not take are left out.

    Raises:
        ValueError: unknown name.
        ModuleNotFoundError: the tracker's package is missing (names the pip extra).
    """
    factory = sink_class(name)
    if name == "wandb" and "fallback_dir" in options:
        options.setdefault("dir", options["fallback_dir"])
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
    tracker_timeout: float | None = None,
    **options: Any,
) -> tuple[list[Any], list[Any]]:
    """The sinks a live trigger logs to, and those among them whose runs it opened itself.

    Args:
        requested: ``None`` (use ``default``), or names and/or sink objects.
        default: what ``None`` means for this trigger (the Trainer's ``report_to`` names,
            the accelerator's trackers as sinks, ...).
        tracker_timeout: seconds each tracker call may take
            (:class:`~uma_callbacks.integrations.bounded.BoundedSink`; the triggers pass
            ``UMAConfig.tracker_timeout_seconds``); ``None``: unbounded.
        **options: passed to :func:`make_sink` for names.

    Returns:
        ``(sinks, own)``: every sink, and the ones built here that did not join an
        already open run (the trigger finishes those at the end).

    Raises:
        ValueError: an unknown name.
        ModuleNotFoundError: a named tracker's package is missing.
    """
    entries = list(default if requested is None else requested)
    sinks: list[Any] = []
    own: list[Any] = []
    for entry in entries:
        if not isinstance(entry, str):
            sinks.append(entry)
            continue
        sink = make_sink(entry, **options)
        capture = getattr(sink, "capture_active_run", None)
        if not (callable(capture) and capture()):
            own.append(sink)
        sinks.append(sink)
    return bounded_pair(sinks, own, tracker_timeout)


def env_tracking_uri() -> str | None:
    """``MLFLOW_TRACKING_URI`` when set (what a run opened through it used)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or None

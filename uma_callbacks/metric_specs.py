"""Metrics from text: ``"hessian:top_k=2,hutchinson_samples=5"`` and JSON config files.

The ``uma`` command builds its metrics with these; so can any tool that takes metric
settings as strings. Values are read as JSON (``2``, ``0.5``, ``true``, ``[0.5,0.9]``,
``"text"``) and fall back to the raw text; the metric's own constructor validates them.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from uma_callbacks.metrics import METRICS, Metric

#: Constructor arguments that only steer memory or time, not the result (left out of listings).
_RUNTIME_ARGS = ("chunk_size", "timeout_seconds")


def parse_metric_spec(spec: str) -> Metric:
    """``"name"`` or ``"name:key=value,key=value"`` -> a metric object.

    Lists may be written with ``;`` between items (``sparsities=0.5;0.9``) or as JSON.

    Raises:
        ValueError: unknown metric name, an option it does not take (listing the ones it
            does), a malformed ``key=value``, or a value its constructor refuses.
    """
    name, _, options = str(spec).partition(":")
    name = name.strip()
    if name not in METRICS:
        raise ValueError(f"--metric: unknown metric {name!r}; choose from {sorted(METRICS)}")
    kwargs: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in _split_options(options))):
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--metric {name}: expected key=value, got {item!r}")
        kwargs[key.strip()] = _value(text.strip())
    return build(name, kwargs)


def build(name: str, kwargs: dict[str, Any]) -> Metric:
    """``METRICS[name](**kwargs)`` with a clear error for an option it does not take.

    Raises:
        ValueError: unknown name or option, or a value the constructor refuses.
    """
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose from {sorted(METRICS)}")
    allowed = metric_options(name)
    unknown = sorted(set(kwargs) - set(allowed) - set(_RUNTIME_ARGS))
    if unknown:
        raise ValueError(f"metric {name!r} takes no option {unknown}; its options are {sorted(allowed)}")
    try:
        return METRICS[name](**kwargs)
    except TypeError as err:  # a wrong type the constructor did not check itself
        raise ValueError(f"metric {name!r}: {err}") from err


def metrics_from_file(path: str | Path) -> list[Metric]:
    """Metrics from a JSON file: ``{"metrics": {"hessian": {"top_k": 2}, "fisher": {}}}``
    (or a list ``[{"name": "hessian", "top_k": 2}, ...]``).

    Raises:
        ValueError: unreadable JSON or a bad entry (naming it).
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--config {path}: not a readable JSON file ({err})") from err
    entries = data.get("metrics") if isinstance(data, dict) else data
    if isinstance(entries, dict):
        entries = [{"name": k, **(v or {})} for k, v in entries.items()]
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("name"), str) for e in entries):
        raise ValueError(f"--config {path}: expected {{'metrics': {{name: {{option: value}}}}}} or a list of {{'name': ...}}")
    return [build(e["name"], {k: v for k, v in e.items() if k != "name"}) for e in entries]


def metric_options(name: str) -> dict[str, Any]:
    """``{option: default}`` of a metric's constructor (runtime-only knobs left out)."""
    params = inspect.signature(METRICS[name]).parameters
    return {
        k: (None if p.default is inspect.Parameter.empty else p.default)
        for k, p in params.items()
        if k not in _RUNTIME_ARGS and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def describe_metrics() -> str:
    """One line per registered metric with its options and defaults (for ``--help``)."""
    lines = []
    for name in sorted(METRICS):
        options = ", ".join(f"{k}={_short(v)}" for k, v in metric_options(name).items())
        lines.append(f"  {name}: {options or '(no options)'}")
    return "\n".join(lines)


def _split_options(text: str) -> Sequence[str]:
    """Split on commas outside brackets/quotes (JSON lists stay whole)."""
    parts, depth, quote, current = [], 0, "", []
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return parts


def _value(text: str) -> Any:
    if ";" in text and not text.startswith(("[", "{", '"')):
        return [_value(t) for t in text.split(";") if t]
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:21] + "..."

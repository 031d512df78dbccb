"""The one metric builder: ``build_metric(spec, seed)``, and metrics from text and JSON files.

Every way in builds its metrics here: ``UMAConfig(metrics=[...])`` (the callback, the
Accelerate hook, ``backfill()``), the ``uma`` command's ``--metrics``, ``--metric`` and
``--config``, and the predecessor's ``UnifiedConfig``. One spec therefore gives one
configuration, and one cache key, on every path: ``"hessian"``, ``"hessian:"``,
``{"name": "hessian"}`` and ``HessianSpectrum(seed=42)`` under ``seed=42`` are the same metric.

A spec is a :class:`~uma_callbacks.metrics.base.Metric`, a name, a
``"name:key=value,key=value"`` string or a ``{"name": ..., option: value}`` mapping. The
run's ``seed`` seeds a metric that takes one unless the spec sets its own: an object built
without a ``seed`` (``FisherInformation()``) is used as a copy with the run's seed, as the
name ``"fisher"`` is (:mod:`uma_callbacks.core.seeds`). Values in text
are read as JSON (``2``, ``0.5``, ``true``, ``[0.5,0.9]``, ``"text"``) and fall back to the
raw text; the metric's own constructor validates them.
"""

from __future__ import annotations

import copy
import inspect
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from uma_callbacks.core.seeds import seed_given
from uma_callbacks.metrics import METRICS, Metric

#: Constructor arguments that only steer memory or time, not the result (left out of listings).
_RUNTIME_ARGS = ("chunk_size", "timeout_seconds")


def build_metric(spec: Any, seed: int | None = None, field: str = "metrics") -> Metric:
    """The metric a spec names, seeded with the run's ``seed`` unless the spec sets one.

    Args:
        spec: a :class:`Metric` (returned as given, or as a copy with ``seed`` when it was
            built without a seed of its own), a name, ``"name:key=value,..."``, or a mapping
            ``{"name": ..., option: value}``.
        seed: the run's seed, for a metric whose constructor takes ``seed`` and whose spec
            does not set it.
        field: the setting named in error messages (``metrics``, ``--metric``, ...).

    Returns:
        The metric object.

    Raises:
        ValueError: unknown name (listing the known ones), an option the metric does not
            take (listing those it does), a malformed ``key=value``, or a value its
            constructor refuses.

    Example:
        >>> build_metric("hessian", seed=7).config() == build_metric({"name": "hessian"}, seed=7).config()
        True
        >>> build_metric("hessian:top_k=3", seed=7).config()["seed"]
        7
    """
    if isinstance(spec, Metric):
        own = getattr(spec, "seed", None)
        if seed is None or own is None or seed_given(own) or own == seed:
            return spec
        seeded = copy.copy(spec)  # the user's object keeps its default: another run may use it
        seeded.seed = int(seed)
        return seeded
    if isinstance(spec, Mapping):
        name = spec.get("name")
        if not isinstance(name, str):
            raise ValueError(f"{field}: a metric mapping needs a string 'name'; got {spec!r:.80}")
        kwargs = {str(k): v for k, v in spec.items() if k != "name"}
    elif isinstance(spec, str):
        name, kwargs = _parse_text(spec, field)
    else:
        raise ValueError(f"{field} entries must be a Metric, a name or a mapping; got {type(spec).__name__}")
    if seed is not None and "seed" not in kwargs and name in METRICS and "seed" in metric_options(name):
        kwargs["seed"] = seed
    return build(name, kwargs, field)


def parse_metric_spec(spec: str, seed: int | None = None) -> Metric:
    """``"name"`` or ``"name:key=value,key=value"`` -> a metric object (:func:`build_metric`).

    Lists may be written with ``;`` between items (``sparsities=0.5;0.9``) or as JSON.

    Raises:
        ValueError: unknown metric name, an option it does not take (listing the ones it
            does), a malformed ``key=value``, or a value its constructor refuses.
    """  # noqa: DOC502 (raised by build_metric)
    return build_metric(str(spec), seed, field="--metric")


def _parse_text(spec: str, field: str) -> tuple[str, dict[str, Any]]:
    name, _, options = spec.partition(":")
    name = name.strip()
    if name not in METRICS:
        raise ValueError(f"{field}: unknown metric {name!r}; choose from {sorted(METRICS)}" + _closest(name))
    kwargs: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in _split_options(options))):
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"{field} {name}: expected key=value, got {item!r}")
        kwargs[key.strip()] = _value(text.strip())
    return name, kwargs


def _closest(name: str) -> str:
    import difflib

    close = difflib.get_close_matches(name, sorted(METRICS), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def build(name: str, kwargs: dict[str, Any], field: str = "metrics") -> Metric:
    """``METRICS[name](**kwargs)`` with a clear error for an option it does not take.

    Raises:
        ValueError: unknown name or option, or a value the constructor refuses.
    """
    if name not in METRICS:
        raise ValueError(f"{field}: unknown metric {name!r}; choose from {sorted(METRICS)}" + _closest(name))
    allowed = metric_options(name)
    unknown = sorted(set(kwargs) - set(allowed) - set(_RUNTIME_ARGS))
    if unknown:
        raise ValueError(f"{field}: metric {name!r} takes no option {unknown}; its options are {sorted(allowed)}")
    try:
        return METRICS[name](**kwargs)
    except TypeError as err:  # a wrong type the constructor did not check itself
        raise ValueError(f"{field}: metric {name!r}: {err}") from err


def metrics_from_file(path: str | Path, seed: int | None = None) -> list[Metric]:
    """Metrics from a JSON file of metric specs, by name with their options.

    The file holds ``{"metrics": {"hessian": {"top_k": 2}, "fisher": {}}}`` or a list
    ``[{"name": "hessian", "top_k": 2}, ...]``.

    Raises:
        ValueError: unreadable JSON or a bad entry (naming it).
    """
    from uma_callbacks.core.safe_json import read_json

    try:
        data = read_json(path)  # bounded: size, nesting depth, strict JSON
    except (OSError, ValueError) as err:
        raise ValueError(f"--config {path}: not a readable JSON file ({err})") from err
    entries = data.get("metrics") if isinstance(data, dict) else data
    if isinstance(entries, dict):
        odd = [k for k, v in entries.items() if v is not None and not isinstance(v, dict)]
        if odd:
            raise ValueError(f"--config {path}: the options of {odd[0]!r} must be an object {{option: value}}")
        entries = [{"name": k, **(v or {})} for k, v in entries.items()]
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("name"), str) for e in entries):
        raise ValueError(f"--config {path}: expected {{'metrics': {{name: {{option: value}}}}}} or a list of {{'name': ...}}")
    return [build_metric(e, seed, field=f"--config {path}") for e in entries]


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

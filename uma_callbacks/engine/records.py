"""The record: what the journal stores and sinks receive (the only engine type sinks know).

A :class:`Record` is one metric's outcome at one step, in JSON form. Its log keys are
``uma/<metric>/<scalar>`` (DESIGN.md's logging contract), plus ``uma/<metric>/seconds``
and ``uma/<metric>/peak_mb`` from its meta.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

#: The prefix of every logged key.
PREFIX = "uma"


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

    @property
    def record_id(self) -> str:
        """Stable id of (step, metric, cache key): a sink delivers each id once."""
        return hashlib.sha256(f"{self.step}|{self.metric}|{self.cache_key}".encode()).hexdigest()[:24]

    def log_values(self) -> dict[str, float]:
        """``{uma/<metric>/<scalar>: value}`` for the finite scalars, with seconds and peak_mb."""
        out = {log_key(self.metric, k): float(v) for k, v in self.scalars.items() if _finite(v)}
        if self.status in ("ok",) and _finite(self.meta.get("seconds")):
            out[log_key(self.metric, "seconds")] = float(self.meta["seconds"])
        if self.status in ("ok",) and _finite(self.meta.get("peak_bytes")):
            out[log_key(self.metric, "peak_mb")] = float(self.meta["peak_bytes"]) / 2**20
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (non-finite scalars become ``None``)."""
        data = asdict(self)
        data["scalars"] = {k: (float(v) if _finite(v) else None) for k, v in self.scalars.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        """Inverse of :meth:`to_dict` (``None`` scalars read back as NaN)."""
        kwargs = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        kwargs["scalars"] = {k: (math.nan if v is None else float(v)) for k, v in data.get("scalars", {}).items()}
        return cls(**kwargs)

    def to_json(self) -> str:
        """Compact, key-sorted JSON."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

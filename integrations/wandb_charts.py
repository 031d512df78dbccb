"""Native W&B charts of a record: eigenvalues over steps, the landscape heatmap, per-module bars.

What :class:`~uma_callbacks.integrations.wandb.WandbSink` logs beside a record's scalars, each
under ``uma/<metric>/charts/`` (no metric's scalar lives there, so no chart meets a scalar key):

- ``uma/<metric>/charts/top_eigenvalues``: a ``wandb.plot.line_series`` of the result's
  ``top_eigenvalues`` array (the Hessian's, the Fisher's), one line per eigenvalue
  (``lambda_1`` the largest) over the steps. W&B shows a custom chart's latest value, so each
  one holds the whole series: every step of this training run's records of the same metric and
  configuration (the configuration asked for: a save the compute budget scaled down stays in
  the series), read from the journal, so a resumed run or a backfill draws it whole;
- ``uma/<metric>/charts/grid``: the landscape's ``grid_losses`` as a ``wandb.Table``
  (``alpha, beta, loss``: one row per grid point, ``beta`` 0 for a 1-D landscape) shown as
  a heatmap (W&B's shipped heatmap preset, the confusion matrix's ``wandb/confusion_matrix/v1``:
  rows along ``alpha``, columns along ``beta``, colour the loss);
- ``uma/<metric>/charts/layers/<scalar>``: a ``wandb.plot.bar`` per per-module scalar
  (``layers/<module>/<scalar>``), one bar per module (``module, value``).

Each chart's table is in the history as ``<key>_table`` and its definition in the run's
config (``_wandb.visualize.<key>``), as W&B logs every custom chart.

Bounded: at most :data:`MAX_SERIES` eigenvalues per step, :data:`MAX_POINTS` steps (the
latest), :data:`MAX_BAR_CHARTS` bar charts of :data:`MAX_BARS` bars, :data:`MAX_GRID_ROWS`
grid points; result files over :data:`MAX_RESULT_BYTES` are not read. A non-finite value is
left out of its chart. Nothing read from disk is trusted: the journal's lines are checked
(their sha256, the record schema), files are read only inside the journal folder and only
while they are what the journal wrote (``file_ids``), JSON is read bounded; anything else
leaves its step out of the chart. A chart that cannot be built is skipped (a debug log):
the record's scalars never depend on it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uma_callbacks.core.records import PREFIX, VALUED, Record, RecordSchemaError, artifact_path
from uma_callbacks.core.records import config_identity as _identity
from uma_callbacks.core.records import config_of as asked_config
from uma_callbacks.core.safe_json import UnreadableJSON, loads_bounded, read_json
from uma_callbacks.integrations.base import tracker_key

logger = logging.getLogger(__name__)

#: The most eigenvalues drawn per step (``lambda_1`` .. ``lambda_16``).
MAX_SERIES = 16
#: The most steps a line series holds (the latest ones).
MAX_POINTS = 500
#: The most per-module bar charts per record (one per scalar name, in name order).
MAX_BAR_CHARTS = 8
#: The most bars in one bar chart (modules in name order).
MAX_BARS = 256
#: The most grid points in the landscape table.
MAX_GRID_ROWS = 10_000
#: The largest result JSON read for a chart, in bytes.
MAX_RESULT_BYTES = 16 * 2**20
#: The most journal records remembered as series points (the rest: left out of the series).
MAX_INDEX = 100_000
#: The most result files whose chart values are kept in memory.
MAX_CACHED = 4096

#: The journal's file in its folder (the engine's ``JOURNAL_FILE``; sinks do not import the engine).
_JOURNAL_FILE = "journal.jsonl"
#: The most new journal bytes read at one call (the rest at the next).
_READ_CHUNK = 64 * 2**20
_LAYER_KEY = re.compile(r"^layers/(?P<module>.+)/(?P<scalar>[^/]+)$")
_VARIANT = re.compile(r"-[0-9a-f]{8}$")


def chart_key(metric: str, name: str) -> str:
    """``uma/<metric>/charts/<name>`` as the tracker receives it.

    Example:
        >>> chart_key("hessian", "top_eigenvalues")
        'uma/hessian/charts/top_eigenvalues'
    """
    return tracker_key(f"{PREFIX}/{metric}/charts/{name}")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------- result files
def _result_file(record: Record) -> str | None:
    """The record's result JSON (``step-N/[folder/]<metric>.json``), the first ``.json`` it names."""
    return next((f for f in record.files if isinstance(f, str) and f.endswith(".json")), None)


def _read_arrays(root: Path, record: Record) -> dict[str, Any]:
    """The ``arrays`` of the record's result JSON, or ``{}`` (no file, refused, unreadable, not that shape)."""
    rel = _result_file(record)
    if rel is None:
        return {}
    ids = record.file_ids if isinstance(record.file_ids, dict) else {}
    if ids and rel not in ids:
        return {}
    path = artifact_path(root, rel, ids.get(rel) if ids else None)
    if path is None:
        return {}
    try:
        data = read_json(path, max_bytes=MAX_RESULT_BYTES)
    except (OSError, UnreadableJSON) as err:
        logger.debug("uma: %s not read for a chart (%s: %.200s)", path, type(err).__name__, err)
        return {}
    arrays = data.get("arrays") if isinstance(data, dict) else None
    return arrays if isinstance(arrays, dict) else {}


def top_eigenvalues(arrays: dict[str, Any]) -> list[float | None] | None:
    """The first :data:`MAX_SERIES` of ``arrays["top_eigenvalues"]`` (``None`` for a non-finite one), or ``None``.

    ``None`` when the array is missing or not a flat list of numbers.
    """
    values = arrays.get("top_eigenvalues")
    if not isinstance(values, list) or not values:
        return None
    out: list[float | None] = []
    for value in values[:MAX_SERIES]:
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
            return None
        out.append(float(value) if value is not None and _finite(value) else None)
    return out


def landscape_rows(arrays: dict[str, Any]) -> list[list[float]] | None:
    """``[alpha, beta, loss]`` per finite grid point (rows along alphas, columns along betas), or ``None``.

    ``grid_losses`` is ``[n, m]`` (a 2-D landscape) or ``[n]`` (1-D: beta 0). ``None`` when
    the arrays are missing or their shapes disagree.
    """
    grid, alphas, betas = arrays.get("grid_losses"), arrays.get("alphas"), arrays.get("betas")
    if not (isinstance(grid, list) and isinstance(alphas, list) and grid and len(grid) == len(alphas)):
        return None
    if not all(_finite(a) for a in alphas):
        return None
    if all(not isinstance(row, list) for row in grid):  # 1-D
        grid, betas = [[v] for v in grid], [0.0]
    if not (isinstance(betas, list) and betas and all(_finite(b) for b in betas)):
        return None
    rows: list[list[float]] = []
    for alpha, line in zip(alphas, grid):
        if not isinstance(line, list) or len(line) != len(betas):
            return None
        for beta, loss in zip(betas, line):
            if loss is not None and not isinstance(loss, (int, float)):
                return None
            if loss is not None and _finite(loss) and len(rows) < MAX_GRID_ROWS:
                rows.append([float(alpha), float(beta), float(loss)])
    return rows


def module_bars(record: Record) -> dict[str, list[list[Any]]]:
    """``{scalar: [[module, value], ...]}`` from the finite ``layers/<module>/<scalar>`` scalars.

    At most :data:`MAX_BAR_CHARTS` scalars and :data:`MAX_BARS` modules each, in name order.
    """
    bars: dict[str, list[list[Any]]] = {}
    for key, value in sorted(record.scalars.items()):
        match = _LAYER_KEY.match(key)
        if match is None or not _finite(value):
            continue
        scalar = match["scalar"]
        if scalar not in bars and len(bars) >= MAX_BAR_CHARTS:
            continue
        rows = bars.setdefault(scalar, [])
        if len(rows) < MAX_BARS:
            rows.append([match["module"], float(value)])
    return bars


# ---------------------------------------------------------------------------- series history
@dataclass(frozen=True)
class _Point:
    """One journal record that may hold a series point: where its values are and whose they are."""

    step: int
    metric: str
    run: str
    asked: str
    raw: str
    record: Record


class SeriesHistory:
    """The earlier points of a record's eigenvalue series, read from its journal folder.

    The journal is read incrementally (only the lines appended since the last call; from the
    start again when the file was replaced or cut), each line checked as the journal checks
    it (sha256 of its record, then the record schema); a torn or altered line is left out.
    Only records with values and a result JSON are kept, at most :data:`MAX_INDEX`. The
    eigenvalues of a record's file are read once and kept (at most :data:`MAX_CACHED` files).
    """

    def __init__(self) -> None:
        self._root: Path | None = None
        self._ident: tuple[int, int] | None = None
        self._offset = 0
        self._points: list[_Point] = []
        self._values: OrderedDict[tuple[str, str], list[float | None] | None] = OrderedDict()

    def series(self, root: Path, record: Record, current: list[float | None]) -> dict[int, list[float | None]]:
        """``{step: eigenvalues}`` of ``record``'s series: the journal's steps, ``record``'s own at its step.

        The series is this training run's (``record.run``) records of the same metric (a
        backfill's copy named ``<metric>-<config hash>`` included) and configuration asked
        for; the latest record of a step wins; at most :data:`MAX_POINTS` steps, the latest.
        """
        self._read(Path(root))
        asked = _identity(asked_config(record))
        out: dict[int, list[float | None]] = {}
        for point in self._points:
            if point.run != record.run or point.asked != asked or point.step == record.step:
                continue
            if point.metric != record.metric and record.metric != f"{point.metric}-{point.raw}":
                continue
            values = self._values_of(Path(root), point.record)
            if values is not None:
                out[point.step] = values
        out[int(record.step)] = current
        return {step: out[step] for step in sorted(out)[-MAX_POINTS:]}

    def _values_of(self, root: Path, record: Record) -> list[float | None] | None:
        rel = _result_file(record) or ""
        ident = record.file_ids.get(rel, {}).get("sha256", "") if isinstance(record.file_ids, dict) else ""
        key = (rel, str(ident))
        if key in self._values:
            self._values.move_to_end(key)
            return self._values[key]
        values = top_eigenvalues(_read_arrays(root, record))
        self._values[key] = values
        while len(self._values) > MAX_CACHED:
            self._values.popitem(last=False)
        return values

    def _read(self, root: Path) -> None:
        path = root / _JOURNAL_FILE
        try:
            st = path.stat()
        except OSError:
            return
        ident = (st.st_dev, st.st_ino)
        if root != self._root or ident != self._ident or st.st_size < self._offset:
            self._root, self._ident, self._offset, self._points = root, ident, 0, []
        if st.st_size == self._offset:
            return
        try:
            with open(path, "rb") as fh:
                fh.seek(self._offset)
                data = fh.read(_READ_CHUNK)
        except OSError as err:
            logger.debug("uma: journal %s not read for the charts (%s)", path, err)
            return
        cut = data.rfind(b"\n") + 1  # a line still being written is read next time
        if cut == 0 and len(data) == _READ_CHUNK:  # one line longer than a chunk: left out
            cut = len(data)
        self._offset += cut
        for line in data[:cut].splitlines():
            record = _checked_record(line)
            if record is None or record.status not in VALUED or _result_file(record) is None:
                continue
            if len(self._points) < MAX_INDEX:
                config = asked_config(record)
                raw = record.meta.get("config") if isinstance(record.meta, dict) else None
                self._points.append(
                    _Point(int(record.step), record.metric, record.run, _identity(config), _identity(raw), record)
                )


def _checked_record(line: bytes) -> Record | None:
    """The record of one journal line (``{"sha": sha256(record JSON)[:16], "record": {...}}``), or None."""
    if not line.strip():
        return None
    try:
        outer = loads_bounded(line)
        if not isinstance(outer, dict):
            return None
        payload = outer["record"]
        body = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
        if hashlib.sha256(body.encode()).hexdigest()[:16] != outer.get("sha"):
            return None
        return Record.from_dict(payload)
    except (UnreadableJSON, RecordSchemaError, KeyError, TypeError, ValueError, RecursionError):
        return None


# ---------------------------------------------------------------------------- the charts
def record_charts(wandb: Any, record: Record, root: Path, files: list[Path], history: SeriesHistory) -> dict[str, Any]:
    """``{key: chart}`` for ``record`` (see the module docstring); a chart that fails is left out.

    Args:
        wandb: the ``wandb`` module.
        record: the record being logged (values measured or cached).
        root: the journal folder.
        files: the record's files that may be read (:func:`~uma_callbacks.integrations.base.uploadable_files`).
        history: the sink's :class:`SeriesHistory`.

    Returns:
        The charts, by tracker key (empty for a record without values).
    """
    if record.status not in VALUED:
        return {}
    charts: dict[str, Any] = {}
    arrays: dict[str, Any] | None = None
    json_files = [p for p in files if p.suffix == ".json"]
    if json_files:
        try:
            arrays = _json_arrays(json_files[0])
        except Exception as err:  # noqa: BLE001 (a chart never costs the record)
            logger.debug("uma: charts of %s at step %s: result not read (%s)", record.metric, record.step, err)
    for name, build in (("top_eigenvalues", _eigen_chart), ("grid", _grid_chart)):
        if arrays is None:
            break
        try:
            chart = build(wandb, record, root, arrays, history)
        except Exception as err:  # noqa: BLE001 (a chart never costs the record)
            logger.debug(
                "uma: chart %s of %s at step %s skipped (%s: %.200s)", name, record.metric, record.step, type(err).__name__, err
            )
            continue
        if chart is not None:
            charts[chart_key(record.metric, name)] = chart
    for scalar, rows in module_bars(record).items():
        try:
            table = wandb.Table(columns=["module", "value"], data=rows)
            title = f"{record.metric}: {scalar} per module, step {record.step}"
            charts[chart_key(record.metric, f"layers/{scalar}")] = wandb.plot.bar(table, "module", "value", title=title)
        except Exception as err:  # noqa: BLE001 (a chart never costs the record)
            logger.debug("uma: bar chart %s of %s skipped (%s: %.200s)", scalar, record.metric, type(err).__name__, err)
    return charts


def _json_arrays(path: Path) -> dict[str, Any]:
    if os.path.getsize(path) > MAX_RESULT_BYTES:
        return {}
    data = read_json(path, max_bytes=MAX_RESULT_BYTES)
    arrays = data.get("arrays") if isinstance(data, dict) else None
    return arrays if isinstance(arrays, dict) else {}


def _eigen_chart(wandb: Any, record: Record, root: Path, arrays: dict[str, Any], history: SeriesHistory) -> Any:
    current = top_eigenvalues(arrays)
    if current is None:
        return None
    points = history.series(root, record, current)
    width = max(len(v) for v in points.values())
    xs: list[list[int]] = [[] for _ in range(width)]
    ys: list[list[float]] = [[] for _ in range(width)]
    for step, values in points.items():
        for i, value in enumerate(values):
            if value is not None:
                xs[i].append(step)
                ys[i].append(value)
    keep = [i for i in range(width) if xs[i]]
    if not keep:
        return None
    return wandb.plot.line_series(
        [xs[i] for i in keep],
        [ys[i] for i in keep],
        keys=[f"lambda_{i + 1}" for i in keep],
        title=f"{record.metric}: top eigenvalues",
        xname="step",
    )


def _grid_chart(wandb: Any, record: Record, root: Path, arrays: dict[str, Any], history: SeriesHistory) -> Any:
    rows = landscape_rows(arrays)
    if not rows:
        return None
    table = wandb.Table(columns=["alpha", "beta", "loss"], data=rows)
    return wandb.plot_table(
        vega_spec_name="wandb/confusion_matrix/v1",
        data_table=table,
        fields={"Actual": "alpha", "Predicted": "beta", "nPredictions": "loss"},
        string_fields={"title": f"{record.metric}: loss over the grid (rows alpha, columns beta), step {record.step}"},
    )

"""``uma report``: every metric's main scalars across steps, from the journal only.

One multi-panel figure (one panel per ``<metric>/<scalar>`` with a top-level scalar name,
i.e. no per-layer keys), written as PNG, and a self-contained HTML page embedding that
PNG (base64) above a table of the values (rows: steps; columns: scalars) and a list of
the errors the journal holds.

Everything on the page comes from the journal only, and the journal is data from disk:
records are checked against the record schema on read (a foreign line is skipped, see
:mod:`uma_callbacks.engine.journal`), files are read only from inside the journal folder,
and every string written into the HTML goes through :func:`html.escape` (:func:`_e`),
numbers included.
"""

from __future__ import annotations

import base64
import html
import math
import os
from pathlib import Path
from typing import Any

from uma_callbacks.engine.journal import JOURNAL_FILE, Journal


def collect_series(journal: Journal) -> dict[str, dict[int, float]]:
    """``{"<metric>/<scalar>": {step: value}}`` of the top-level scalars of ``ok`` records.

    A later record for the same (metric, step) replaces an earlier one.
    """
    series: dict[str, dict[int, float]] = {}
    for record in journal.records():
        if record.status not in ("ok", "partial"):
            continue
        for key, value in record.scalars.items():
            if "/" in key or not isinstance(value, (int, float)):
                continue
            series.setdefault(f"{record.metric}/{key}", {})[int(record.step)] = float(value)
    return dict(sorted(series.items()))


def collect_results(journal: Journal) -> dict[str, list[tuple[int, Any]]]:
    """``{metric: [(step, MetricResult)]}`` of the ``ok`` records, in step order, arrays included.

    A later record for the same (metric, step) replaces an earlier one.
    """
    latest: dict[tuple[str, int], Any] = {}
    for record in journal.records():
        if record.status in ("ok", "partial"):
            latest[(record.metric, int(record.step))] = record
    out: dict[str, list[tuple[int, Any]]] = {}
    for (metric, step), record in sorted(latest.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        out.setdefault(metric, []).append((step, journal.load_result(record)))
    return out


def draw_trends(results: dict[str, list[tuple[int, Any]]], out: Path) -> list[Path]:
    """The across-checkpoint figures the metric families registered (needs matplotlib)."""
    from uma_callbacks.plots import draw_trends as draw

    return draw(results, out)


def find_journal(path: str | os.PathLike[str]) -> Journal:
    """The journal of a run folder (``<run>/uma``) or a journal folder itself.

    Raises:
        FileNotFoundError: neither holds a ``journal.jsonl``.
    """
    path = Path(path)
    for candidate in (path, path / "uma"):
        if (candidate / JOURNAL_FILE).is_file():
            return Journal(candidate)
    raise FileNotFoundError(f"no {JOURNAL_FILE} in {path} or {path / 'uma'}: nothing measured there yet")


def draw_report(series: dict[str, dict[int, float]], png: Path, title: str = "uma report") -> Path:
    """Draw one panel per series (value against step) into ``png``.

    Raises:
        ValueError: no series to draw.
    """
    if not series:
        raise ValueError("report: the journal holds no successful records to draw")
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = len(series)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False)
    for ax, (name, points) in zip(axes.flat, series.items()):
        steps = sorted(points)
        ax.plot(steps, [points[s] for s in steps], "o-", ms=3)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


def write_report(source: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None) -> tuple[Path, Path]:
    """Draw the report of a run (or journal) folder; returns ``(png path, html path)``.

    Args:
        source: the run folder or its journal folder.
        out_dir: where to write ``report.png`` and ``report.html``; None: the journal folder.

    Raises:
        FileNotFoundError: no journal.
        ValueError: nothing to draw.
    """
    journal = find_journal(source)
    series = collect_series(journal)
    out = Path(out_dir) if out_dir is not None else journal.root
    png = draw_report(series, out / "report.png", title=f"uma report: {Path(source).resolve().name}")
    trends = draw_trends(collect_results(journal), out)
    errors = [r for r in journal.records() if r.status not in ("ok", "cached")]
    page = _html(series, png, errors, trends)
    html_path = out / "report.html"
    html_path.write_text(page, encoding="utf-8")
    return png, html_path


def _e(value: Any) -> str:
    """``value`` as HTML text: every ``& < > " '`` escaped, whatever its type."""
    return html.escape(str(value), quote=True)


def _html(series: dict[str, dict[int, float]], png: Path, errors: list[Any], trends: list[Path] = ()) -> str:
    image = base64.b64encode(png.read_bytes()).decode("ascii")
    extra = "".join(
        f"<h2>{_e(p.stem)}</h2><img alt='{_e(p.stem)}' "
        f"src='data:image/png;base64,{base64.b64encode(p.read_bytes()).decode('ascii')}'/>"
        for p in trends
    )
    steps = sorted({s for points in series.values() for s in points})
    head = "".join(f"<th>{_e(name)}</th>" for name in series)
    rows = []
    for step in steps:
        cells = "".join(
            f"<td>{_e(format(series[name][step], '.6g'))}</td>" if step in series[name] else "<td></td>"
            for name in series
        )
        rows.append(f"<tr><th>{_e(step)}</th>{cells}</tr>")
    error_items = "".join(
        f"<li>step {_e(r.step)} {_e(r.metric)}: {_e(r.status)}: {_e((r.error or {}).get('message', ''))}</li>"
        for r in errors
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>uma report</title>"
        "<style>body{font-family:sans-serif}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}</style></head><body>"
        "<h1>uma report</h1>"
        f"<img alt='metrics across steps' src='data:image/png;base64,{image}'/>"
        + extra
        + f"<h2>Values</h2><table><tr><th>step</th>{head}</tr>{''.join(rows)}</table>"
        + (f"<h2>Errors</h2><ul>{error_items}</ul>" if error_items else "")
        + "</body></html>"
    )

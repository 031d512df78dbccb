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
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from uma_callbacks.engine.journal import JOURNAL_FILE, Journal

logger = logging.getLogger(__name__)


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


def draw_trends(results: dict[str, list[tuple[int, Any]]], out: Path, skipped: list[str] | None = None) -> list[Path]:
    """The across-checkpoint figures the metric families registered (needs matplotlib).

    Results come from disk: a figure whose drawer fails is drawn again without the
    results it fails on (each tried alone), so one odd result is left out alone and the
    figure keeps the others. What is left out is appended to ``skipped`` as
    ``"<metric> at step <N>: <reason>"`` (or ``"<metric>: <reason>"`` for a whole figure).
    """
    from uma_callbacks.plots import TREND_DRAWERS

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    skipped = skipped if skipped is not None else []
    paths: list[Path] = []
    for name, drawer in TREND_DRAWERS.items():
        pairs = results.get(name)
        if not pairs:
            continue
        try:
            paths += _guarded(drawer, pairs, out)
            continue
        except Exception:  # noqa: BLE001 (a drawer fed odd data from disk; found and left out below)
            pass
        good = []
        for step, result in pairs:
            try:
                with tempfile.TemporaryDirectory() as scratch:
                    _guarded(drawer, [(step, result)], Path(scratch))
                good.append((step, result))
            except Exception as err:  # noqa: BLE001
                skipped.append(f"{name} at step {step}: {type(err).__name__}: {str(err)[:200]}")
        try:
            paths += _guarded(drawer, good, out) if good else []
        except Exception as err:  # noqa: BLE001 (fails only together: leave the figure out)
            skipped.append(f"{name}: {type(err).__name__}: {str(err)[:200]}")
    for reason in skipped:
        logger.warning("uma report: left out of the figures: %s", reason)
    return paths


def _guarded(drawer: Any, pairs: list[tuple[int, Any]], out: Path) -> list[Path]:
    """``drawer(pairs, out)``, closing the figures it opened when it raises."""
    import matplotlib.pyplot as plt

    before = set(plt.get_fignums())
    try:
        return list(drawer(pairs, out))
    except BaseException:
        for number in set(plt.get_fignums()) - before:
            plt.close(number)
        raise


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


#: Units of the scalars whose unit is known, by scalar name (the y-axis labels).
UNITS = {
    "seconds": "s",
    "peak_mb": "MiB",
    "loss": "nats",
    "loss_start": "nats",
    "loss_end": "nats",
    "center_loss": "nats",
    "loss_mean": "nats",
    "loss_std": "nats",
    "barrier_height": "nats",
    "icl_loss_drop": "nats",
    "output_entropy": "nats",
    "mean_entropy": "fraction of log(#keys)",
    "effective_rank": "eigenvalues",
    "distance": "weight-space L2",
    "distance_from_first": "weight-space L2",
    "update_norm": "weight-space L2",
}
#: Bookkeeping scalars left out of the report figure (they are in the table).
_LEFT_OUT = ("seconds", "peak_mb", "over_budget")


def _band_of(name: str, series: dict[str, dict[int, float]]) -> str | None:
    """``<metric>/<x>_stderr`` for ``<metric>/<x>`` when the journal has it (drawn as a band)."""
    band = f"{name}_stderr"
    return band if band in series else None


def draw_report(series: dict[str, dict[int, float]], png: Path, title: str = "uma report") -> Path:
    """Draw one panel per quantity (value against step) into ``png``.

    Each quantity once: a ``*_stderr`` series is drawn as the ±1 standard-error band of its
    quantity, not as a panel of its own; seconds and peak memory stay in the table. Panels
    are titled by metric, the y-axis names the scalar and its unit, steps are integers and
    no axis uses an offset.

    Raises:
        ValueError: no series to draw.
    """
    if not series:
        raise ValueError("report: the journal holds no successful records to draw")
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    from uma_callbacks.plots import save_figure

    bands = {n for name in series if (n := _band_of(name, series))}
    candidates = [n for n in series if n not in bands and n.rsplit("/", 1)[-1] not in _LEFT_OUT] or list(series)
    names, same_as = _each_quantity_once(candidates, series)
    n = len(names)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 2.9 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        points = {s: v for s, v in series[name].items() if _drawable(v)}
        left_out = len(series[name]) - len(points)
        steps = sorted(points)
        values = [points[s] for s in steps]
        ax.plot(steps, values, "o-", ms=3)
        band = _band_of(name, series)
        if band:
            err = [series[band][s] if _drawable(series[band].get(s, math.nan)) else math.nan for s in steps]
            ax.fill_between(steps, [v - e for v, e in zip(values, err)], [v + e for v, e in zip(values, err)],
                            alpha=0.25, label="±1 s.e.")  # fmt: skip
            ax.legend(fontsize=6, loc="best")
        metric, scalar = name.split("/", 1)
        unit = UNITS.get(scalar)
        twins = [t.removeprefix(f"{metric}/") for t in same_as.get(name, [])]  # the panel title names the metric
        also = f" (= {twins[0]})" if len(twins) == 1 else f" (= {len(twins)} identical series)" if twins else ""
        also += f" [{left_out} value(s) beyond ±{_DRAWABLE:g}: in the table]" if left_out else ""
        ax.set_title(metric + also, fontsize=7, loc="left")
        ax.set_ylabel(f"{scalar} ({unit})" if unit else scalar, fontsize=7)
        ax.set_xlabel("step", fontsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_formatter(FuncFormatter(_tick_format(values)))  # no offset text over the title
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (2.9 * rows)))  # room for the title above the first row
    png.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_figure(fig, png, dpi=90)  # atomic: no empty report.png on a full disk
    finally:
        plt.close(fig)
    return png


#: The largest magnitude drawn (matplotlib's axis arithmetic overflows near 1e308); larger
#: values are listed in the table only, and the panel says how many.
_DRAWABLE = 1e200


def _drawable(value: float) -> bool:
    return math.isfinite(value) and abs(value) <= _DRAWABLE


def _tick_format(values: list[float]):
    """Tick labels with as many digits as the panel's range needs, never an offset or a multiplier.

    ``3.91275`` and ``3.913``, ``4e-05``: the value is read off the axis itself.
    """
    finite = [v for v in values if math.isfinite(v)] or [0.0]
    span = max(finite) / 2 - min(finite) / 2  # halves: +-1e308 must not overflow to inf
    scale = max(abs(v) for v in finite) or 1.0
    ratio = scale / span / 2 if span > 0 else math.inf
    digits = max(3, min(10, math.ceil(math.log10(ratio)) + 3)) if 0 < ratio < math.inf else 3
    return lambda value, _pos: f"{value:.{digits}g}"


def _each_quantity_once(names: list[str], series: dict[str, dict[int, float]]) -> tuple[list[str], dict[str, list[str]]]:
    """Drop series that repeat an earlier one step for step (the probe loss several metrics report).

    Returns ``(kept names, {kept: [the names it stands for]})``.
    """
    kept: list[str] = []
    same_as: dict[str, list[str]] = {}
    for name in names:
        twin = next((k for k in kept if _same_values(series[k], series[name])), None)
        if twin is None:
            kept.append(name)
        else:
            same_as.setdefault(twin, []).append(name)
    return kept, same_as


def _same_values(a: dict[int, float], b: dict[int, float]) -> bool:
    return set(a) == set(b) and all(math.isclose(a[s], b[s], rel_tol=1e-9, abs_tol=1e-12) for s in a)


def step_figures(journal: Journal) -> list[tuple[str, Path]]:
    """``(caption, png)`` of the figures of each metric's latest step (read from inside the journal only)."""
    latest: dict[str, Any] = {}
    for record in journal.records():
        if record.status in ("ok", "partial") and (record.metric not in latest or record.step >= latest[record.metric].step):
            latest[record.metric] = record
    out = []
    for metric, record in sorted(latest.items()):
        for rel in record.files:
            path = journal.resolve_file(rel)
            if path is not None and path.suffix == ".png":
                out.append((f"{metric} at step {record.step}: {path.stem}", path))
    return out


def write_report(
    source: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None, journal: Journal | None = None
) -> tuple[Path, Path]:
    """Draw the report of a run (or journal) folder; returns ``(png path, html path)``.

    Args:
        source: the run folder or its journal folder.
        out_dir: where to write ``report.png`` and ``report.html``; None: the journal folder.
        journal: the journal of ``source`` when already open (its counts of skipped lines and
            unreadable files then tell what this report left out).

    Everything read comes from disk and is checked: a damaged or odd result file, or a
    result a figure cannot be drawn from, is left out alone, warned about and listed on
    the page; the rest of the report is drawn.

    Raises:
        FileNotFoundError: no journal.
        ValueError: nothing to draw.
    """  # noqa: DOC502 (from find_journal and draw_report)
    journal = journal if journal is not None else find_journal(source)
    series = collect_series(journal)
    out = Path(out_dir) if out_dir is not None else journal.root
    png = draw_report(series, out / "report.png", title=f"uma report: {Path(source).resolve().name}")
    skipped: list[str] = []
    trends = draw_trends(collect_results(journal), out, skipped)
    errors = [r for r in journal.records() if r.status not in ("ok", "cached")]
    skipped += [f"unreadable result file {Path(p).name}" for p in journal.unreadable_files]
    page = _html(series, png, errors, trends, step_figures(journal), skipped)
    html_path = out / "report.html"
    html_path.write_text(page, encoding="utf-8")
    return png, html_path


def _e(value: Any) -> str:
    """``value`` as HTML text: every ``& < > " '`` escaped, whatever its type."""
    return html.escape(str(value), quote=True)


def _html(
    series: dict[str, dict[int, float]],
    png: Path,
    errors: list[Any],
    trends: list[Path] = (),
    figures: list[tuple[str, Path]] = (),
    skipped: list[str] = (),
) -> str:
    image = base64.b64encode(png.read_bytes()).decode("ascii")
    per_step = "".join(
        f"<figure><img alt='{_e(caption)}' src='data:image/png;base64,{base64.b64encode(path.read_bytes()).decode('ascii')}'/>"
        f"<figcaption>{_e(caption)}</figcaption></figure>"
        for caption, path in figures
    )
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
        + (f"<h2>Latest figures of each metric</h2>{per_step}" if per_step else "")
        + f"<h2>Values</h2><table><tr><th>step</th>{head}</tr>{''.join(rows)}</table>"
        + (f"<h2>Errors</h2><ul>{error_items}</ul>" if error_items else "")
        + (f"<h2>Left out (odd content on disk)</h2><ul>{''.join(f'<li>{_e(x)}</li>' for x in skipped)}</ul>" if skipped else "")
        + "</body></html>"
    )

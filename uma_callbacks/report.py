"""``uma report``: every metric's main scalars across steps, from the journal only.

One multi-panel figure (one panel per ``<metric>/<scalar>`` with a top-level scalar name,
i.e. no per-layer keys), written as PNG, and a self-contained HTML page embedding that
PNG (base64) above a table of the values (rows: steps; columns: scalars) and a list of
the errors the journal holds. Loss spikes (records ``spike``, :mod:`uma_callbacks.triggers.spike`)
are a red dashed line at their step on every panel (named in each panel's legend with its
z-score), the values measured at a spike (``spike/<metric>``) a red cross on their metric's
panel, and the page lists them under "Spikes", right below the figure, with what the line and
the crosses mean.

Everything on the page comes from the journal only, and the journal is data from disk:
records are checked against the record schema on read (a foreign line is skipped, see
:mod:`uma_callbacks.engine.journal`), files are read only from inside the journal folder,
and every string written into the HTML goes through :func:`html.escape` (:func:`_e`),
numbers included.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from uma_callbacks.core.records import MEASURED, config_of
from uma_callbacks.core.records import config_identity as _identity
from uma_callbacks.core.spike import SPIKE_METRIC, SPIKE_PREFIX
from uma_callbacks.engine.journal import JOURNAL_FILE, Journal

logger = logging.getLogger(__name__)


def _in_variant_folder(record: Any) -> bool:
    """Whether the record's files live in ``step-<N>/<metric>-<hash>/`` (a second configuration at that step)."""
    prefix = f"step-{int(record.step)}/"
    return any(isinstance(f, str) and f.startswith(prefix) and f.count("/") >= 2 for f in record.files)


#: The most options a series label names; the rest are counted (``+2 more``).
_LABEL_OPTIONS = 3


class ConfigSeries:
    """Which series each measured record belongs to: one per (metric, asked configuration).

    A metric measured with one configuration is labelled by its name (``fisher``). A metric
    measured with several (a backfill with ``top_k=5`` beside the training's ``top_k=10``)
    has one series per configuration, each labelled by the options that tell them apart
    (``fisher (top_k=5)`` and ``fisher (top_k=10)``), never merged into plain ``fisher``.

    The metric's main configuration is the one most of its records in the plain step
    folders were measured with (the training's, when there was one): its trend figures
    keep their plain file names; another configuration's go to ``<metric>-<hash>/``.
    """

    def __init__(self, records: list[Any]) -> None:
        """Group ``records`` (the measured ones) by metric and configuration."""
        self.configs: dict[str, dict[str, dict[str, Any] | None]] = {}  # metric -> identity -> config
        counts: dict[tuple[str, str], list[int]] = {}  # (metric, identity) -> [records in plain folders, first index]
        for index, record in enumerate(records):
            config = config_of(record)
            identity = _identity(config)
            self.configs.setdefault(record.metric, {}).setdefault(identity, config)
            tally = counts.setdefault((record.metric, identity), [0, index])
            tally[0] += 0 if _in_variant_folder(record) else 1
        self.main = {
            metric: min(ids, key=lambda i: (-counts[(metric, i)][0], counts[(metric, i)][1]))
            for metric, ids in self.configs.items()
        }
        self.labels = {metric: _labels(metric, ids) for metric, ids in self.configs.items()}

    def label(self, record: Any) -> str:
        """The series label of ``record`` (its metric, and the options that differ when there are several)."""
        return self.labels[record.metric][_identity(config_of(record))]

    def folder(self, record: Any) -> str:
        """``""`` for the metric's main configuration, else ``"<metric>-<hash>"`` (where its trend figures go)."""
        identity = _identity(config_of(record))
        return "" if identity == self.main[record.metric] else f"{record.metric}-{identity}"

    def folders(self) -> dict[str, str]:
        """``{series label: folder}``: ``""`` for each metric's main configuration, else ``"<metric>-<hash>"``."""
        return {
            self.labels[metric][identity]: "" if identity == self.main[metric] else f"{metric}-{identity}"
            for metric, ids in self.configs.items()
            for identity in ids
        }

    def several(self) -> dict[str, dict[str, dict[str, Any] | None]]:
        """``{label: configuration}`` of the metrics measured with more than one configuration."""
        return {
            self.labels[metric][identity]: config
            for metric, ids in sorted(self.configs.items())
            if len(ids) > 1
            for identity, config in ids.items()
        }


def _labels(metric: str, configs: dict[str, dict[str, Any] | None]) -> dict[str, str]:
    """``{identity: label}``: the metric's name, with the options that differ when it has several configurations."""
    if len(configs) == 1:
        return {identity: metric for identity in configs}
    keys = sorted({k for c in configs.values() for k in (c or {}) if k != "metric"})
    differing = [k for k in keys if len({_option_text((c or {}).get(k, "-")) for c in configs.values()}) > 1]
    labels: dict[str, str] = {}
    for identity, config in configs.items():
        config = config or {}
        options = [f"{k}={_option_text(config.get(k, '-'))}" for k in differing[:_LABEL_OPTIONS]]
        if len(differing) > _LABEL_OPTIONS:
            options.append(f"+{len(differing) - _LABEL_OPTIONS} more")
        if not config:
            options = ["config unknown"]
        labels[identity] = f"{metric} ({', '.join(options)})"
    seen: dict[str, int] = {}
    for label in labels.values():
        seen[label] = seen.get(label, 0) + 1
    return {  # two configurations that read the same once shortened: told apart by their hash
        identity: (f"{label[:-1]}, #{identity})" if seen[label] > 1 else label) for identity, label in labels.items()
    }


def _option_text(value: Any) -> str:
    """An option's value in a label: short, and without ``/`` (the series name's separator)."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    text = text.replace("/", "\u2215").replace("(", "[").replace(")", "]")
    return text if len(text) <= 24 else text[:21] + "..."


def _measured(journal: Journal) -> list[Any]:
    return [r for r in journal.records() if r.status in MEASURED]


def collect_series(journal: Journal) -> dict[str, dict[int, float]]:
    """``{"<series label>/<scalar>": {step: value}}`` of the top-level scalars of measured records.

    The label is the metric's name, or its name and the options that differ when the
    journal holds the metric measured with several configurations (:class:`ConfigSeries`).
    A later record for the same (series, step) replaces an earlier one.
    """
    records = _measured(journal)
    configs = ConfigSeries(records)
    series: dict[str, dict[int, float]] = {}
    for record in records:
        label = configs.label(record)
        for key, value in record.scalars.items():
            if "/" in key or not isinstance(value, (int, float)):
                continue
            series.setdefault(f"{label}/{key}", {})[int(record.step)] = float(value)
    return dict(sorted(series.items()))


def collect_results(journal: Journal) -> dict[str, list[tuple[int, Any]]]:
    """``{series label: [(step, MetricResult)]}`` of the measured records, in step order, arrays included.

    Labels as in :func:`collect_series`; a later record for the same (series, step) replaces
    an earlier one.
    """
    records = _measured(journal)
    configs = ConfigSeries(records)
    latest: dict[tuple[str, int], Any] = {}
    for record in records:
        latest[(configs.label(record), int(record.step))] = record
    out: dict[str, list[tuple[int, Any]]] = {}
    for (label, step), record in sorted(latest.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        out.setdefault(label, []).append((step, journal.load_result(record)))
    return out


def draw_trends(
    results: dict[str, list[tuple[int, Any]]],
    out: Path,
    skipped: list[str] | None = None,
    folders: dict[str, str] | None = None,
) -> list[Path]:
    """The across-checkpoint figures the metric families registered (needs matplotlib).

    ``results`` is keyed by series label (:func:`collect_results`); a label's figures go to
    ``out / folders[label]`` (another configuration of a metric: ``<metric>-<hash>/``, so it
    never replaces the main configuration's figure).

    Results come from disk: a figure whose drawer fails is drawn again without the
    results it fails on (each tried alone), so one odd result is left out alone and the
    figure keeps the others. What is left out is appended to ``skipped`` as
    ``"<label> at step <N>: <reason>"`` (or ``"<label>: <reason>"`` for a whole figure).
    """
    from uma_callbacks.plots import TREND_DRAWERS
    from uma_callbacks.plots.panels import split_name

    out = Path(out)
    skipped = skipped if skipped is not None else []
    folders = folders or {}
    paths: list[Path] = []
    for name, drawer in TREND_DRAWERS.items():
        for label in sorted(lab for lab in results if split_name(f"{lab}/_")[0] == name):
            pairs = results[label]
            if not pairs:
                continue
            folder = out / folders.get(label, "")
            folder.mkdir(parents=True, exist_ok=True)
            paths += _draw_trend(drawer, label, pairs, folder, skipped)
    for reason in skipped:
        logger.warning("uma report: left out of the figures: %s", reason)
    return paths


def _draw_trend(drawer: Any, label: str, pairs: list[tuple[int, Any]], out: Path, skipped: list[str]) -> list[Path]:
    """One drawer's figures, leaving out alone each result it fails on."""
    try:
        return _guarded(drawer, pairs, out)
    except Exception:  # noqa: BLE001 (a drawer fed odd data from disk; found and left out below)
        pass
    good = []
    for step, result in pairs:
        try:
            with tempfile.TemporaryDirectory() as scratch:
                _guarded(drawer, [(step, result)], Path(scratch))
            good.append((step, result))
        except Exception as err:  # noqa: BLE001
            skipped.append(f"{label} at step {step}: {type(err).__name__}: {str(err)[:200]}")
    try:
        return _guarded(drawer, good, out) if good else []
    except Exception as err:  # noqa: BLE001 (fails only together: leave the figure out)
        skipped.append(f"{label}: {type(err).__name__}: {str(err)[:200]}")
        return []


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


def spike_markers(journal: Journal) -> list[Any]:
    """The journal's loss spikes: its ``spike`` marker records, one per step (the latest), in step order."""
    latest: dict[int, Any] = {}
    for record in _measured(journal):
        if record.metric == SPIKE_METRIC:
            latest[int(record.step)] = record
    return [latest[step] for step in sorted(latest)]


def draw_report(
    series: dict[str, dict[int, float]], png: Path, title: str = "uma report", spikes: Sequence[Any] = ()
) -> tuple[Path, list[str]]:
    """Draw ``report.png``: one panel per quantity against the step (:func:`uma_callbacks.plots.panels.report_figure`).

    Panels share the run's x range; a y range is at least 5% of the value's magnitude; a
    quantity that is constant or has a single value is one item of a text row under the
    panels instead of a panel. ``spikes`` (:func:`spike_markers`): a red dashed line at each
    spike's step on every panel, named in the panel's legend (``loss spike, z=943``); the
    ``spike/...`` series are no panels of their own, each value is a red cross on its metric's
    panel instead ("measured at the spike", and in the table).

    Returns:
        ``(png, not drawn)``: the items of the text row (also listed on the HTML page).

    Raises:
        ValueError: no series to draw.
    """  # noqa: DOC502 (from report_figure)
    from uma_callbacks.plots import save_figure
    from uma_callbacks.plots.panels import report_figure

    checkpoints = {n: v for n, v in series.items() if not n.startswith(SPIKE_PREFIX)} or series
    if spikes:
        title += "\nred dashed: loss spikes at " + ", ".join(f"step {r.step} (z={_z_text(r)})" for r in spikes[:8])
    built = report_figure(checkpoints, title)
    if spikes:
        _mark_spikes(built, series, spikes)
    png.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_figure(built.figure, png, dpi=90)  # atomic: no empty report.png on a full disk
    finally:
        import matplotlib.pyplot as plt

        plt.close(built.figure)
    return png, built.not_drawn


def _z_text(record: Any) -> str:
    z = record.scalars.get("z") if isinstance(record.scalars, dict) else None
    return format(z, ".3g") if isinstance(z, (int, float)) else "?"


#: How many spikes a panel's legend names one by one (the rest: one entry).
_LEGEND_SPIKES = 3


def _spike_label(records: Sequence[Any]) -> list[str]:
    """The legend entry of each spike line: ``loss spike, z=943`` for the first few, then one for the rest."""
    labels = []
    for n, record in enumerate(records):
        spike = record.meta.get("spike") if isinstance(record.meta, dict) else None
        key = spike.get("key") if isinstance(spike, dict) and isinstance(spike.get("key"), str) else "loss"
        if n < _LEGEND_SPIKES:
            labels.append(f"{key[:20]} spike, z={_z_text(record)}")
        elif n == _LEGEND_SPIKES:
            labels.append(f"{len(records) - _LEGEND_SPIKES} more spike(s)")
        else:
            labels.append("_nolegend_")
    return labels


def _mark_spikes(built: Any, series: dict[str, dict[int, float]], spikes: Sequence[Any]) -> None:
    """A red dashed line at each spike step on every panel, in its legend; the ``spike/<metric>/<scalar>`` values as red crosses on theirs."""
    import math

    from uma_callbacks.plots.panels import drawable, split_name

    steps = [int(r.step) for r in spikes]
    labels = _spike_label(spikes)

    measured: dict[tuple[str, str], dict[int, float]] = {}
    for name, points in series.items():
        if name.startswith(SPIKE_PREFIX):
            metric, _, scalar = split_name(name[len(SPIKE_PREFIX) :])
            measured.setdefault((metric, scalar), {}).update({s: v for s, v in points.items() if drawable(v)})
    for ax, panel in zip(built.figure.axes, built.panels):
        low, high = ax.get_xlim()
        pad = max(1.0, 0.02 * (max(steps + [high]) - min(steps + [low])))
        ax.set_xlim(min([low] + [s - pad for s in steps]), max([high] + [s + pad for s in steps]))
        for step, label in zip(steps, labels):
            ax.axvline(step, color="tab:red", ls="--", lw=1.0, alpha=0.8, zorder=0, label=label)
        points = measured.get((panel.metric, panel.scalar))
        if points:
            ax.plot(
                list(points), list(points.values()), "x", color="tab:red", ms=6, mew=1.5,
                label="measured at the spike", clip_on=False,
            )  # fmt: skip
            bottom, top = ax.get_ylim()
            values = [v for v in points.values() if math.isfinite(v)]
            margin = 0.08 * (max(values + [top]) - min(values + [bottom]))
            ax.set_ylim(min([bottom] + [v - margin for v in values]), max([top] + [v + margin for v in values]))
        ax.legend(fontsize=6, loc="best")


def step_figures(journal: Journal) -> list[tuple[str, Path]]:
    """``(caption, png)`` of the figures of each series' latest step (read from inside the journal only).

    One entry per (metric, configuration): another configuration's figures are captioned with its label.
    """
    records = _measured(journal)
    configs = ConfigSeries(records)
    latest: dict[str, Any] = {}
    for record in records:
        label = configs.label(record)
        if label not in latest or record.step >= latest[label].step:
            latest[label] = record
    out = []
    for label, record in sorted(latest.items()):
        for rel in record.files:
            path = journal.resolve_file(rel)
            if path is not None and path.suffix == ".png":
                out.append((f"{label} at step {record.step}: {path.stem}", path))
    return out


#: Statuses listed under "Errors": the metric failed. ``skipped`` (nothing to measure yet,
#: or a budget that had no room) is listed apart, under "Skipped".
FAILED = ("error", "timeout", "interrupted")


def outcomes(journal: Journal) -> dict[str, list[Any]]:
    """The records the page lists apart from the values: ``{"errors", "skipped", "partial", "measured_later"}``.

    - ``errors``: failures (:data:`FAILED`);
    - ``skipped``: expected skips (``"no previous checkpoint yet"`` at the first checkpoint,
      a compute budget with no room), never listed as errors;
    - ``partial``: values kept, but an iterative method stopped short of its accuracy;
    - ``measured_later``: failures and skips of a (metric, step, configuration) that a later
      record measured after all (a rerun); counted on the page, not listed.
    """
    records = journal.records()
    done: dict[tuple[str, int, str], int] = {}  # the last index measured (or cached) per key
    for index, record in enumerate(records):
        if record.status in MEASURED or record.status == "cached":
            done[(record.metric, int(record.step), _identity(config_of(record)))] = index
    out: dict[str, list[Any]] = {"errors": [], "skipped": [], "partial": [], "measured_later": []}
    for index, record in enumerate(records):
        if record.status == "partial":
            out["partial"].append(record)
        if record.status not in FAILED and record.status != "skipped":
            continue
        if done.get((record.metric, int(record.step), _identity(config_of(record))), -1) > index:
            out["measured_later"].append(record)
        else:
            out["errors" if record.status in FAILED else "skipped"].append(record)
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
    spikes = spike_markers(journal)
    png, not_drawn = draw_report(series, out / "report.png", title=f"uma report: {Path(source).resolve().name}", spikes=spikes)
    configs = ConfigSeries(_measured(journal))
    folders = configs.folders()
    left_out: list[str] = []
    trends = draw_trends(collect_results(journal), out, left_out, folders)
    captions = {folder: label for label, folder in folders.items() if folder}
    trend_items = [(_trend_caption(p, out, captions), p) for p in trends]
    left_out += [f"unreadable result file {Path(p).name}" for p in journal.unreadable_files]
    page = _html(
        series, png, outcomes(journal), trend_items, step_figures(journal), left_out, not_drawn, configs.several(), spikes
    )
    html_path = out / "report.html"
    html_path.write_text(page, encoding="utf-8")
    return png, html_path


def _trend_caption(path: Path, out: Path, labels: dict[str, str]) -> str:
    """``pruning-trend``, or ``pruning (sparsities=[0.5]): pruning-trend`` for another configuration's figure."""
    folder = path.parent.name if path.parent != out else ""
    return f"{labels[folder]}: {path.stem}" if folder in labels else path.stem


def _e(value: Any) -> str:
    """``value`` as HTML text: every ``& < > " '`` escaped, whatever its type."""
    return html.escape(str(value), quote=True)


def _items(records: list[Any], with_status: bool = True) -> str:
    def message(r: Any) -> str:
        text = (r.error or {}).get("message", "")
        if not text and isinstance(r.meta, dict):
            text = str(r.meta.get("partial_reason", ""))
        return text

    return "".join(
        f"<li>step {_e(r.step)} {_e(r.metric)}: " + (f"{_e(r.status)}: " if with_status else "") + f"{_e(message(r))}</li>"
        for r in records
    )


def _spike_item(record: Any) -> str:
    """One line of the "Spikes" list: the step, the logged value, its z-score, the window and what was measured."""
    spike = record.meta.get("spike") if isinstance(record.meta, dict) else None
    spike = spike if isinstance(spike, dict) else {}
    metrics = record.meta.get("metrics") if isinstance(record.meta, dict) else None
    scalars = record.scalars if isinstance(record.scalars, dict) else {}

    def number(name: str) -> str:
        value = scalars.get(name)
        return format(value, ".6g") if isinstance(value, (int, float)) else "?"

    measured = ", ".join(str(m) for m in metrics) if isinstance(metrics, list) else "?"
    return (
        f"<li>step {_e(record.step)}: {_e(spike.get('key', '?'))} = {_e(number('value'))}, z = {_e(number('z'))} "
        f"(median {_e(number('median'))}, scale {_e(number('scale'))} over {_e(spike.get('window_values', '?'))} values); "
        f"measured: {_e(measured)}</li>"
    )


#: What the spike marks on the figure mean, above the list of spikes.
SPIKE_NOTE = (
    "A red dashed line on every panel marks a step whose logged value was a robust outlier of the "
    "values logged before it: z = |value - median| / scale, scale = 1.4826 x their median absolute "
    "deviation (1.2533 x the mean absolute deviation when that is 0). A red cross is a metric "
    "measured at that step on the model in memory, with no checkpoint (the weights after that "
    "step's update)."
)


def _spikes_html(spikes: Sequence[Any]) -> str:
    """The "Spikes" section: what the marks mean, then one line per spike (empty without spikes)."""
    if not spikes:
        return ""
    return f"<h2 id='spikes'>Spikes</h2><p>{_e(SPIKE_NOTE)}</p><ul>{''.join(_spike_item(r) for r in spikes)}</ul>"


def _png(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def _html(
    series: dict[str, dict[int, float]],
    png: Path,
    listed: dict[str, list[Any]],
    trends: list[tuple[str, Path]] = (),
    figures: list[tuple[str, Path]] = (),
    left_out: list[str] = (),
    not_drawn: list[str] = (),
    configs: dict[str, Any] | None = None,
    spikes: Sequence[Any] = (),
) -> str:
    per_step = "".join(
        f"<figure><img alt='{_e(caption)}' src='data:image/png;base64,{_png(path)}'/><figcaption>{_e(caption)}</figcaption></figure>"
        for caption, path in figures
    )
    extra = "".join(
        f"<h2>{_e(caption)}</h2><img alt='{_e(caption)}' src='data:image/png;base64,{_png(path)}'/>" for caption, path in trends
    )
    steps = sorted({s for points in series.values() for s in points})
    head = "".join(f"<th>{_e(name)}</th>" for name in series)
    rows = []
    for step in steps:
        cells = "".join(
            f"<td>{_e(format(series[name][step], '.6g'))}</td>" if step in series[name] else "<td></td>" for name in series
        )
        rows.append(f"<tr><th>{_e(step)}</th>{cells}</tr>")
    config_items = "".join(
        f"<li>{_e(label)}: {_e(json.dumps(config, sort_keys=True, default=str))}</li>"
        for label, config in (configs or {}).items()
    )
    later = len(listed.get("measured_later", []))
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>uma report</title>"
        "<style>body{font-family:sans-serif}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}</style></head><body>"
        "<h1>uma report</h1>"
        f"<img alt='metrics across steps' src='data:image/png;base64,{_png(png)}'/>"
        + _spikes_html(spikes)
        + (
            f"<h2>Not drawn (constant or a single value)</h2><ul>{''.join(f'<li>{_e(x)}</li>' for x in not_drawn)}</ul>"
            if not_drawn
            else ""
        )
        + (f"<h2>Configurations</h2><ul>{config_items}</ul>" if config_items else "")
        + extra
        + (f"<h2>Latest figures of each metric</h2>{per_step}" if per_step else "")
        + f"<h2>Values</h2><table><tr><th>step</th>{head}</tr>{''.join(rows)}</table>"
        + (f"<h2 id='errors'>Errors</h2><ul>{_items(listed['errors'])}</ul>" if listed.get("errors") else "")
        + (f"<h2 id='skipped'>Skipped</h2><ul>{_items(listed['skipped'], False)}</ul>" if listed.get("skipped") else "")
        + (
            f"<h2 id='partial'>Partial (values kept, accuracy not reached)</h2><ul>{_items(listed['partial'], False)}</ul>"
            if listed.get("partial")
            else ""
        )  # fmt: skip
        + (f"<p>{_e(later)} earlier failure(s) or skip(s) were measured again later (not listed).</p>" if later else "")
        + (
            f"<h2>Left out (odd content on disk)</h2><ul>{''.join(f'<li>{_e(x)}</li>' for x in left_out)}</ul>"
            if left_out
            else ""
        )
        + "</body></html>"
    )

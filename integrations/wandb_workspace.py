"""A saved W&B workspace over the ``uma/*`` keys the W&B sink logs (``uma dashboard wandb``).

Built with ``wandb-workspaces`` (the optional extra ``uma-callbacks[workspaces]``, imported
only inside the functions that need it). Every chart is on the ``uma/step`` axis the sink
binds ``uma/*`` to (:data:`~uma_callbacks.integrations.wandb.STEP_KEY`). The workspace has:

- a pinned ``uma status`` section: a line plot of each metric's outcome per step,
  ``uma/<metric>/status_code`` (0 ok, 1 partial, 2 skipped, 3 timeout, 4 interrupted, 5 error:
  :mod:`~uma_callbacks.integrations.status_codes`), a line plot of each metric's ``seconds``
  (a point at every step with a value, ``ok`` or ``partial``; a gap where a step failed or was
  skipped), a run comparer (each run's summary: ``uma/<metric>/status`` with ``status_step``,
  ``error`` while a failure is shown, ``skipped`` with its reason) and a note saying so;
  the runs table pins ``summary:uma/<metric>/status`` and ``status_step`` for each metric,
  so which metric is ``partial`` or ``error``, at which step, is one column per metric;
- a ``uma spectra`` section (when a spectrum was logged): the spectrum scalars
  (``top_eigenvalue``, ``top_k_effective_rank``, ``top_k_condition_number``, ``trace``) of
  each curvature metric in one line plot, each spectrum figure, and each custom chart the
  run logged under ``uma/<metric>/`` (``wandb.plot.line_series`` and the like: its own
  chart definition, read from the run);
- one section ``uma/<metric>`` per metric family: a line plot per scalar
  ``uma/<metric>/<scalar>``, a line plot per per-module scalar chosen by the regex
  ``^uma/<metric>/layers/.*/<scalar>$`` (and per parameter, ``params/<name>/<scalar>``), a media browser of the figures
  ``uma/<metric>/figures/<name>`` (landscape, CKA and attention heatmaps, ...) by step, and
  the latest per-module table ``uma/<metric>/modules``.

The keys come from a run (:func:`keys_from_api` online, or :meth:`LoggedKeys.from_history_keys`
with W&B's ``historyKeys`` shape): then only the families, scalars, figures and charts the
run logged are shown. Without a run every registered metric gets a section whose plots
select their keys by regex (figures, tables and charts need a run: their keys are not
known before).

:func:`workspace_json` writes the workspace in the library's own model (the view
``Workspace.save`` uploads, ``internal.View``); :func:`workspace_from_json` reads it back.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from uma_callbacks.core.records import PREFIX
from uma_callbacks.integrations.status_codes import STATUS_CODE, status_legend
from uma_callbacks.integrations.wandb import STEP_KEY

_INSTALL = "the W&B workspace needs wandb-workspaces: pip install 'uma-callbacks[workspaces]'"
#: Keys read from a run, at most (a run is data from anywhere: bounded).
MAX_KEYS = 50_000
#: Series on one per-module plot, at most (the regex selects them all on the server).
MAX_SERIES = 100
#: Scalars of a top-k spectrum (:func:`~uma_callbacks.metrics.hessian.spectrum_scalars`, and the trace).
SPECTRUM_SCALARS = ("top_eigenvalue", "top_k_effective_rank", "top_k_condition_number", "trace")
#: Metrics with a spectrum, shown in the spectra section when no run says what was logged.
SPECTRAL_METRICS = ("hessian", "fisher")
#: Scalars about the measurement itself, plotted together in the status section.
COST_SCALARS = ("seconds", "peak_mb", "over_budget")
#: W&B types of a media value in ``historyKeys`` (a figure).
MEDIA_TYPES = ("image-file", "images/separated", "html-file", "plotly-file", "video-file")
_FAMILY = re.compile(r"^uma/(?P<metric>[A-Za-z0-9_.-]+)/(?P<rest>.+)$")


def _import_workspaces() -> tuple[Any, Any]:
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError as err:
        raise ModuleNotFoundError(_INSTALL) from err
    return ws, wr


@dataclass(frozen=True)
class Chart:
    """A custom chart a run logged (``wandb.plot.line_series``): its table and its definition.

    Attributes:
        key: the logged key (``uma/hessian/spectrum``); its table is ``<key>_table``.
        panel_def: the chart's Vega definition (``wandb/lineseries/v0``).
        fields: the chart's field settings (``{"step": "step", "lineKey": ..., ...}``).
        strings: the chart's string settings (``{"title": ..., "xname": ...}``).
    """

    key: str
    panel_def: str
    fields: dict[str, str] = field(default_factory=dict)
    strings: dict[str, str] = field(default_factory=dict)

    @property
    def table_key(self) -> str:
        """The history key of the chart's table."""
        return f"{self.key}_table"


@dataclass
class LoggedKeys:
    """What a run logged under ``uma/``: history keys with their W&B type, summary keys, charts.

    Attributes:
        history: ``{key: type}``, type ``number``, ``image-file``, ``table-file``, ...
        summary: the run summary's ``uma/*`` keys.
        charts: the custom charts logged under ``uma/<metric>/``.
    """

    history: dict[str, str] = field(default_factory=dict)
    summary: set[str] = field(default_factory=set)
    charts: list[Chart] = field(default_factory=list)

    @classmethod
    def from_history_keys(cls, history_keys: Any, summary: Iterable[Any] = (), config: Any = None) -> LoggedKeys:
        """Read W&B's shapes: ``historyKeys``, the summary's keys, the run's raw config.

        Anything of another shape is left out (read from a server or a file: not trusted);
        at most :data:`MAX_KEYS` keys are read.

        Args:
            history_keys: ``{"keys": {key: {"typeCounts": [{"type": "number", ...}]}}}``.
            summary: the summary's keys.
            config: the raw config (``{"_wandb": {"visualize": {key: {"panel_config": ...}}}}``),
                or ``None``.

        Returns:
            The run's ``uma/*`` keys (``uma/step`` left out).
        """
        out = cls()
        keys = history_keys.get("keys") if isinstance(history_keys, Mapping) else None
        for n, (key, info) in enumerate(keys.items() if isinstance(keys, Mapping) else ()):
            if n >= MAX_KEYS:
                break
            if isinstance(key, str) and _FAMILY.match(key) and key != STEP_KEY:
                out.history[key] = _main_type(info)
        for n, key in enumerate(summary):
            if n >= MAX_KEYS:
                break
            if isinstance(key, str) and _FAMILY.match(key):
                out.summary.add(key)
        out.charts = _charts(config, out.history)
        return out

    def families(self) -> list[str]:
        """The metric families, sorted (``uma/<metric>/...`` in the history or the summary)."""
        names = set()
        for key in (*self.history, *self.summary):
            match = _FAMILY.match(key)
            if match:
                names.add(match["metric"])
        return sorted(names)


def _main_type(info: Any) -> str:
    counts = info.get("typeCounts") if isinstance(info, Mapping) else None
    best, most = "unknown", -1
    for item in counts if isinstance(counts, list) else ():
        if isinstance(item, Mapping) and isinstance(item.get("type"), str):
            count = item.get("count", 0)
            count = count if isinstance(count, int) and not isinstance(count, bool) else 0
            if count > most:
                best, most = item["type"], count
    return best


def _charts(config: Any, history: Mapping[str, str]) -> list[Chart]:
    """The custom charts in ``config["_wandb"]["visualize"]`` whose table the history holds."""
    wb = config.get("_wandb") if isinstance(config, Mapping) else None
    wb = wb.get("value", wb) if isinstance(wb, Mapping) and "visualize" not in wb else wb
    visualize = wb.get("visualize") if isinstance(wb, Mapping) else None
    charts = []
    for key, spec in sorted(visualize.items()) if isinstance(visualize, Mapping) else ():
        panel = spec.get("panel_config") if isinstance(spec, Mapping) else None
        if not (isinstance(key, str) and isinstance(panel, Mapping) and f"{key}_table" in history):
            continue
        panel_def = panel.get("panelDefId")
        if isinstance(panel_def, str):
            charts.append(Chart(key, panel_def, _str_dict(panel.get("fieldSettings")), _str_dict(panel.get("stringSettings"))))
    return charts


def _str_dict(value: Any) -> dict[str, str]:
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(value, Mapping) else {}


def keys_from_api(path: str, run_id: str, api: Any = None) -> LoggedKeys:
    """The ``uma/*`` keys run ``ENTITY/PROJECT/run_id`` logged, read through ``wandb.Api`` (online).

    Args:
        path: ``ENTITY/PROJECT``.
        run_id: the run's id.
        api: a ``wandb.Api`` (default: a new one).

    Returns:
        The run's keys.

    Raises:
        ValueError: the run cannot be read (unknown, no access, no network).
    """
    if api is None:
        import wandb

        api = wandb.Api()
    try:
        run = api.run(f"{path}/{run_id}")
        history_keys = getattr(run, "_attrs", {}).get("historyKeys")
        if history_keys is None:  # a lazily loaded run: load its full data
            run.load(force=True)
            history_keys = run._attrs.get("historyKeys")
        if isinstance(history_keys, str) and len(history_keys) < 64 * 2**20:  # JSON text, as GraphQL may give it
            history_keys = json.loads(history_keys)
        summary, config = list(run.summary.keys()), run.rawconfig
    except Exception as err:  # noqa: BLE001 (wandb's CommError, an unknown run, no access: one message)
        raise ValueError(f"--run {run_id}: cannot read run {path}/{run_id} from W&B ({type(err).__name__}: {str(err)[:300]})") from err
    return LoggedKeys.from_history_keys(history_keys, summary, config)


def registry_keys() -> list[str]:
    """The registered metric families (``uma_callbacks.metrics.METRICS``): the sections without a run."""
    from uma_callbacks.metrics import METRICS

    return sorted(METRICS)


def split_path(path: str) -> tuple[str, str]:
    """``ENTITY/PROJECT`` as ``(entity, project)``.

    Args:
        path: ``ENTITY/PROJECT``.

    Returns:
        ``(entity, project)``.

    Raises:
        ValueError: ``path`` is not two non-empty names joined by one ``/``.
    """
    parts = path.split("/") if isinstance(path, str) else []
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise ValueError(f"ENTITY/PROJECT: expected two names joined by '/' (e.g. my-team/my-project), got {path!r}")
    return parts[0], parts[1]


def build_workspace(
    entity: str, project: str, keys: LoggedKeys | None = None, name: str = "uma diagnostics", run_id: str | None = None
) -> Any:
    """The workspace (a ``wandb_workspaces.workspaces.Workspace``); see the module docstring.

    Args:
        entity: the W&B entity (user or team).
        project: the W&B project.
        keys: what a run logged (only its families and keys are shown); ``None``: every
            registered metric, with regex-selected plots.
        name: the workspace's name.
        run_id: the run the keys came from; its id is shown in the note.

    Returns:
        The workspace, validated by the library's models (not saved).

    Raises:
        ModuleNotFoundError: wandb-workspaces is not installed (names the extra).
    """  # noqa: DOC502 (from _import_workspaces)
    ws, wr = _import_workspaces()
    families = keys.families() if keys is not None else registry_keys()
    sections = [_status_section(ws, wr, families, keys, run_id)]
    spectra = _spectra_section(ws, wr, families, keys)
    if spectra is not None:
        sections.append(spectra)
    sections += [_family_section(ws, wr, metric, keys) for metric in families]
    pinned = []
    for metric in families:
        for tag in ("status", "status_step"):
            key = f"{PREFIX}/{metric}/{tag}"
            if keys is None or key in keys.summary:
                pinned.append(f"summary:{key}")
    return ws.Workspace(
        entity=entity,
        project=project,
        name=name,
        sections=sections,
        settings=ws.WorkspaceSettings(x_axis=STEP_KEY, group_by_prefix="last"),
        runset_settings=ws.RunsetSettings(pinned_columns=pinned),
    )


def _line(wr: Any, title: str, ys: list[str], regex: str | None = None, w: int = 8) -> Any:
    return wr.LinePlot(title=title, x=STEP_KEY, y=ys, metric_regex=regex, layout=wr.Layout(w=w, h=6))


def _section(ws: Any, name: str, panels: list[Any], is_open: bool = False, pinned: bool = False) -> Any:
    return ws.Section(
        name=name,
        panels=panels,
        is_open=is_open,
        pinned=pinned,
        panel_settings=ws.SectionPanelSettings(x_axis=STEP_KEY),
    )


def _numbers(keys: LoggedKeys, metric: str) -> list[str]:
    """The family's numeric history keys, sorted (the status codes left out: the status section plots them)."""
    return sorted(
        k
        for k, t in keys.history.items()
        if t == "number" and k.startswith(f"{PREFIX}/{metric}/") and not k.endswith(f"/{STATUS_CODE}")
    )


def _status_codes(keys: LoggedKeys | None) -> tuple[list[str], str | None]:
    """The status-code keys to plot, and a regex when no run says which were logged.

    With a run: every numeric ``.../status_code`` key it logged (``uma/spike/<metric>/status_code``
    too). Without: a regex over every metric's (``uma/<metric>/status_code``).
    """
    if keys is None:
        return [], f"^{re.escape(PREFIX)}/.+/{re.escape(STATUS_CODE)}$"
    return sorted(k for k, t in keys.history.items() if t == "number" and k.endswith(f"/{STATUS_CODE}")), None


def _status_section(ws: Any, wr: Any, families: list[str], keys: LoggedKeys | None, run_id: str | None) -> Any:
    seconds = [f"{PREFIX}/{m}/seconds" for m in families]
    if keys is not None:
        seconds = [k for k in seconds if keys.history.get(k) == "number"]
    source = f"run {run_id}" if run_id else "the metric registry"
    codes, codes_regex = _status_codes(keys)
    note = (
        "**Status of each metric** (keys from " + source + ").\n\n"
        f"- `uma/<metric>/status_code` at each step: {status_legend()} (from 3 up: failed); "
        "the first plot.\n"
        "- `uma/<metric>/status` in the run summary: the latest outcome shown (`ok`, `partial`: kept, "
        "but an iterative method did not reach its stated accuracy; `error`, `timeout`, `interrupted`; "
        "`skipped`), at step `uma/<metric>/status_step`; pinned as columns of the runs table.\n"
        "- `uma/<metric>/error`: the failure's message while a failure is shown; "
        "`uma/<metric>/skipped`: the latest skip's reason.\n"
        "- The seconds plot: a point at every step a metric has a value (`ok` or `partial`); "
        "a gap is a step that failed or was skipped.\n"
    )
    panels = [wr.MarkdownPanel(markdown=note, layout=wr.Layout(w=8, h=6))]
    if codes or codes_regex:
        panels.append(_line(wr, f"status per step ({status_legend()})", codes, regex=codes_regex))
    if seconds:
        panels.append(_line(wr, "seconds per metric (gaps: failed or skipped steps)", seconds))
    panels.append(wr.RunComparer(layout=wr.Layout(w=8, h=6)))
    return _section(ws, "uma status", panels, is_open=True, pinned=True)


def _spectra_section(ws: Any, wr: Any, families: list[str], keys: LoggedKeys | None) -> Any | None:
    panels = []
    for metric in families:
        names = [f"{PREFIX}/{metric}/{s}" for s in SPECTRUM_SCALARS]
        if keys is not None:
            present = [k for k in names if keys.history.get(k) == "number"]
            if any(k.rsplit("/", 1)[1] != "trace" for k in present):  # a spectrum, not only a trace
                panels.append(_line(wr, f"{metric}: top-k spectrum", present))
            figure = f"{PREFIX}/{metric}/figures/spectrum"
            if keys.history.get(figure) in MEDIA_TYPES:
                panels.append(wr.MediaBrowser(title=f"{metric}: spectrum", media_keys=[figure], gallery_axis="step"))
        elif metric in SPECTRAL_METRICS:
            regex = f"^{PREFIX}/{re.escape(metric)}/({'|'.join(SPECTRUM_SCALARS)})$"
            panels.append(_line(wr, f"{metric}: top-k spectrum", [], regex=regex))
    for chart in keys.charts if keys is not None else ():
        panels.append(
            wr.CustomChart(
                query={"summaryTable": {"tableKey": chart.table_key}},
                chart_name=chart.panel_def,
                chart_fields=dict(chart.fields),
                chart_strings=dict(chart.strings),
                layout=wr.Layout(w=12, h=8),
            )
        )
    return _section(ws, "uma spectra", panels, is_open=True) if panels else None


def _family_section(ws: Any, wr: Any, metric: str, keys: LoggedKeys | None) -> Any:
    base = f"{PREFIX}/{metric}/"
    panels = []
    if keys is None:
        panels.append(_line(wr, f"{metric}: scalars", [], regex=f"^{re.escape(base)}[^/]+$", w=12))
        panels.append(_line(wr, f"{metric}: per module", [], regex=f"^{re.escape(base)}layers/.*$", w=12))
        return _section(ws, f"uma/{metric}", panels)
    numbers = _numbers(keys, metric)
    top = [k for k in numbers if "/" not in k[len(base) :]]
    for key in top:
        scalar = key[len(base) :]
        if scalar not in COST_SCALARS:
            panels.append(_line(wr, f"{metric}: {scalar}", [key]))
    cost = [k for k in top if k[len(base) :] in COST_SCALARS]
    if cost:
        panels.append(_line(wr, f"{metric}: cost", cost))
    per_item: dict[tuple[str, str], list[str]] = {}
    for key in numbers:
        parts = key[len(base) :].split("/")
        if len(parts) == 2:  # a nested scalar of its own
            panels.append(_line(wr, f"{metric}: {parts[0]} {parts[1]}", [key]))
        elif len(parts) >= 3:  # layers/<module>/<scalar>, params/<name>/<scalar>, ...
            per_item.setdefault((parts[0], parts[-1]), []).append(key)
    for (group, scalar), series in sorted(per_item.items(), key=lambda kv: (kv[0][0] != "layers", kv[0])):
        regex = f"^{re.escape(base + group)}/.*/{re.escape(scalar)}$"
        label = "per module" if group == "layers" else f"per {group}"
        panels.append(_line(wr, f"{metric}: {scalar} {label}", series[:MAX_SERIES], regex=regex, w=12))
    figures = sorted(k for k, t in keys.history.items() if t in MEDIA_TYPES and k.startswith(f"{base}figures/"))
    if figures:
        panels.append(wr.MediaBrowser(title=f"{metric}: figures", media_keys=figures, gallery_axis="step", layout=wr.Layout(w=12, h=8)))
    table = f"{base}modules"
    if keys.history.get(table) == "table-file":
        # the default size: wandb-workspaces 0.4.13 reads this panel back without its layout
        panels.append(wr.WeavePanelSummaryTable(table_name=table))
    return _section(ws, f"uma/{metric}", panels)


def workspace_json(workspace: Any) -> str:
    """The workspace as JSON: the view ``Workspace.save`` uploads (``internal.View``), by alias.

    Args:
        workspace: a ``wandb_workspaces.workspaces.Workspace``.

    Returns:
        Indented JSON.
    """
    return workspace._to_model().model_dump_json(by_alias=True, exclude_none=True, indent=2)  # the library's own form


def workspace_from_json(text: str) -> Any:
    """A workspace read back from :func:`workspace_json`'s output, checked by the library's models.

    Args:
        text: the JSON.

    Returns:
        The ``Workspace``.

    Raises:
        ValueError: the text is not a workspace view (the library's validation error).
    """
    ws, _wr = _import_workspaces()
    from pydantic import ValidationError
    from wandb_workspaces.workspaces import internal

    try:
        view = internal.View.model_validate_json(text)
    except ValidationError as err:
        raise ValueError(f"not a W&B workspace view: {str(err)[:500]}") from err
    return ws.Workspace._from_model(view)


def panel_keys(workspace: Any) -> list[tuple[str, str]]:
    """Every ``(kind, key)`` the workspace's panels name: ``metric``, ``regex``, ``media``, ``table``.

    Args:
        workspace: a ``wandb_workspaces.workspaces.Workspace``.

    Returns:
        The pairs, in panel order (the x-axis ``uma/step`` left out).
    """
    out: list[tuple[str, str]] = []
    for section in workspace.sections:
        for panel in section.panels:
            kind = type(panel).__name__
            if kind == "LinePlot":
                out += [("metric", y) for y in panel.y if isinstance(y, str)]
                if panel.metric_regex:
                    out.append(("regex", panel.metric_regex))
            elif kind == "MediaBrowser":
                out += [("media", k) for k in panel.media_keys]
            elif kind == "WeavePanelSummaryTable":
                out.append(("table", panel.table_name))
            elif kind == "CustomChart":
                out.append(("table", panel.query["summaryTable"]["tableKey"]))
    return out


def describe(workspace: Any) -> str:
    """One line per section: its name and panel count.

    Args:
        workspace: a ``wandb_workspaces.workspaces.Workspace``.

    Returns:
        The lines.
    """
    return "\n".join(f"  {s.name}: {len(s.panels)} panel(s)" for s in workspace.sections)


__all__ = [
    "Chart",
    "LoggedKeys",
    "build_workspace",
    "describe",
    "keys_from_api",
    "panel_keys",
    "registry_keys",
    "split_path",
    "workspace_from_json",
    "workspace_json",
]

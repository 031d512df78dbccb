"""The W&B workspace (``uma dashboard wandb``) against the keys a real offline W&B run logged."""

from __future__ import annotations

import json
import re
import socket
import sys

import pytest

from tests.integrations.wandb_runfile import history_rows, settled_records
from tests.trainer_cases import run_trainer, tiny_lm_dataset

wandb = pytest.importorskip("wandb")
pytest.importorskip("wandb_workspaces")

from uma_callbacks.integrations import wandb_workspace as wsp  # noqa: E402

METRICS = ["gradient_flow", "fisher", "landscape:n_points=3", "interpolation"]


def _nested(items) -> dict:
    """A run file's config or summary items as one nested dict."""
    out: dict = {}
    for item in items:
        path = [item.key] if item.key else list(item.nested_key)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = json.loads(item.value_json)
    return out


def _logged(records):
    """What the run file holds, in W&B's ``historyKeys`` shape, with its summary keys and config."""
    types: dict = {}
    for row in history_rows(records):
        media = {k[: -len("/_type")]: v for k, v in row.items() if k.endswith("/_type")}
        for key, value in row.items():
            if key.endswith("/_type"):
                types[key[: -len("/_type")]] = value
            elif not any(key.startswith(m + "/") for m in media) and isinstance(value, (int, float)):
                types.setdefault(key, "number")
    summary, config = set(), {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "summary":
            summary |= {(i.key or "/".join(i.nested_key)) for i in record.summary.update}
        elif kind == "config":
            config.update(_nested(record.config.update))
    history_keys = {"keys": {k: {"typeCounts": [{"type": t, "count": 1}]} for k, t in types.items()}}
    return types, summary, history_keys, config


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A tiny Qwen2 Trainer run measured into an offline W&B run; its run file read back."""
    from uma_callbacks import UMACallback
    from uma_callbacks.engine.journal import Journal

    tmp = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp / "wb"), "WANDB_SILENT": "true",
                            "WANDB_PROJECT": "uma-test"}.items():
            mp.setenv(name, value)
        (tmp / "wb").mkdir()
        wandb.teardown()
        cb = UMACallback(trackers=["wandb"], metrics=METRICS, probe=tiny_lm_dataset(n=8), probe_size=8)
        run_trainer(tmp / "out", callbacks=[cb])
        if wandb.run is not None:
            wandb.finish()
        journal = [r for r in Journal(tmp / "out" / "uma").records() if r.status in ("ok", "partial")]
        valued = {(r.step, r.metric) for r in journal}
        records = settled_records(
            tmp / "wb",
            lambda rows: {(r["uma/step"], m) for r in rows if "uma/step" in r for m in ("gradient_flow", "fisher", "landscape", "interpolation")
                          if f"uma/{m}/seconds" in r} >= valued,
        )
        wandb.teardown()
    return _logged(records), journal


def _regex_matches(regex: str, keys) -> list[str]:
    return [k for k in keys if re.search(regex, k)]


@pytest.mark.slow
def test_every_panel_shows_a_key_the_run_logged_and_every_family_has_a_section(demo_run):
    (types, summary, history_keys, config), journal = demo_run
    keys = wsp.LoggedKeys.from_history_keys(history_keys, summary, config)
    assert keys.families() == ["fisher", "gradient_flow", "interpolation", "landscape"]
    workspace = wsp.build_workspace("my-team", "uma-test", keys, run_id="abc")

    # the library's own models: the view validates and reads back to the same JSON
    from wandb_workspaces.workspaces import internal

    text = wsp.workspace_json(workspace)
    view = internal.View.model_validate_json(text)
    assert view.entity == "my-team" and view.project == "uma-test"
    assert wsp.workspace_json(wsp.workspace_from_json(text)) == text
    assert view.spec.section.settings.x_axis == "uma/step"

    names = [s.name for s in workspace.sections]
    assert names[:2] == ["uma status", "uma spectra"]
    assert sorted(n for n in names if n.startswith("uma/")) == [f"uma/{m}" for m in keys.families()]
    assert all(s.panel_settings.x_axis == "uma/step" for s in workspace.sections)

    pairs = wsp.panel_keys(workspace)
    for kind, key in pairs:
        if kind == "metric":
            assert types.get(key) == "number", key
        elif kind == "media":
            assert types.get(key) == "image-file", key
        elif kind == "table":
            assert types.get(key) == "table-file", key
        else:  # a regex selects logged keys of its family only
            matched = _regex_matches(key, types)
            assert matched, key
            assert all(types[k] == "number" for k in matched), key
    for record in journal:  # every value the run logged is on some panel
        for key in record.log_values():
            assert any(k == key for kind, k in pairs if kind == "metric") or any(
                re.search(r, key) for kind, r in pairs if kind == "regex"
            ), key
    # per-module plots chosen by regex over layers/<module>/<scalar>
    regexes = [k for kind, k in pairs if kind == "regex"]
    assert sorted(_regex_matches(r"^uma/gradient_flow/layers/.*/norm$", types)) == sorted(
        _regex_matches(next(r for r in regexes if "gradient_flow" in r and "norm" in r), types)
    )
    # the figures: landscape heatmap, spectrum, per-layer bars, interpolation curve
    media = {k for kind, k in pairs if kind == "media"}
    assert {"uma/landscape/figures/landscape", "uma/fisher/figures/spectrum", "uma/interpolation/figures/interpolation"} <= media
    assert media == {k for k, t in types.items() if t == "image-file"}
    # status per step: one plot of every metric's uma/<metric>/status_code, first in the status section
    status = workspace.sections[0]
    plot = next(p for p in status.panels if type(p).__name__ == "LinePlot")
    assert plot.y == sorted(f"uma/{m}/status_code" for m in keys.families())
    assert "0 ok, 1 partial, 2 skipped" in plot.title
    assert not [k for kind, k in pairs if kind == "metric" and k.endswith("/status_code") and k not in plot.y]
    # status: the summary's status and step of each family, pinned in the runs table
    pinned = set(workspace.runset_settings.pinned_columns) - {"run:displayName"}
    assert pinned == {f"summary:uma/{m}/{t}" for m in keys.families() for t in ("status", "status_step")}
    assert all(p.removeprefix("summary:") in summary for p in pinned)


@pytest.mark.slow
def test_a_line_series_chart_the_run_logged_becomes_a_chart_panel(tmp_path, monkeypatch):
    """A ``wandb.plot.line_series`` under ``uma/<metric>/`` (its definition read from the run) is a chart panel."""
    for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(name, value)
    wandb.teardown()
    run = wandb.init(project="uma-test")
    run.define_metric("uma/*", step_metric="uma/step")
    chart = wandb.plot.line_series(xs=[1, 2, 3], ys=[[3.0, 2.0, 1.0]], keys=["step 3"], title="Hessian top eigenvalues", xname="rank")
    run.log({"uma/step": 3, "uma/hessian/top_eigenvalue": 3.0, "uma/hessian/spectrum": chart})
    run.finish()
    records = settled_records(tmp_path, lambda rows: any("uma/step" in r for r in rows))
    wandb.teardown()
    _types, summary, history_keys, config = _logged(records)
    keys = wsp.LoggedKeys.from_history_keys(history_keys, summary, config)
    assert [(c.key, c.panel_def) for c in keys.charts] == [("uma/hessian/spectrum", "wandb/lineseries/v0")]
    workspace = wsp.build_workspace("e", "p", keys)
    spectra = next(s for s in workspace.sections if s.name == "uma spectra")
    charts = [p for p in spectra.panels if type(p).__name__ == "CustomChart"]
    assert len(charts) == 1 and charts[0].chart_name == "wandb/lineseries/v0"
    assert charts[0].query == {"summaryTable": {"tableKey": "uma/hessian/spectrum_table"}}
    assert charts[0].chart_fields == {"step": "step", "lineKey": "lineKey", "lineVal": "lineVal"}
    assert wsp.workspace_from_json(wsp.workspace_json(workspace)).sections[1].name == "uma spectra"


def test_hostile_history_keys_are_left_out():
    keys = wsp.LoggedKeys.from_history_keys(
        {"keys": {"uma/fisher/trace": {"typeCounts": [{"type": "number", "count": 2}]}, 7: {}, "loss": {},
                  "uma/x/y": "not a dict", "uma/step": {}}},
        ["uma/fisher/status", None],
        {"_wandb": {"visualize": {"uma/a/b": {"panel_config": {"panelDefId": "x"}}, "uma/c": "bad"}}},
    )
    assert keys.history == {"uma/fisher/trace": "number", "uma/x/y": "unknown"}
    assert keys.summary == {"uma/fisher/status"} and keys.charts == []  # no table logged for uma/a/b
    assert wsp.LoggedKeys.from_history_keys(None, (), None).families() == []


class _Api:
    """A ``wandb.Api`` stand-in: one run with the public API's attributes, or a refusal."""

    def __init__(self, run=None):
        self._run = run

    def run(self, path):
        if self._run is None:
            raise ValueError(f"Could not find run {path}")
        return self._run


def test_run_keys_read_through_the_public_api_shapes():
    from types import SimpleNamespace

    history = {"keys": {"uma/fisher/trace": {"typeCounts": [{"type": "number", "count": 2}]},
                        "uma/fisher/figures/spectrum": {"typeCounts": [{"type": "image-file", "count": 2}]}}, "lastStep": 9}
    run = SimpleNamespace(_attrs={"historyKeys": json.dumps(history)}, summary={"uma/fisher/status": "partial"}, rawconfig={})
    keys = wsp.keys_from_api("e/p", "abc", api=_Api(run))
    assert keys.history == {"uma/fisher/trace": "number", "uma/fisher/figures/spectrum": "image-file"}
    assert keys.summary == {"uma/fisher/status"} and keys.families() == ["fisher"]
    with pytest.raises(ValueError, match="--run abc"):
        wsp.keys_from_api("e/p", "abc", api=_Api())


def test_dry_run_writes_the_json_and_opens_no_socket(tmp_path, monkeypatch, capsys):
    from uma_callbacks.cli import main

    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    out = tmp_path / "ws.json"
    assert main(["dashboard", "wandb", "my-team/my-project", "--dry-run", str(out)]) == 0
    workspace = wsp.workspace_from_json(out.read_text())
    assert (workspace.entity, workspace.project) == ("my-team", "my-project")
    names = [s.name for s in workspace.sections]
    from uma_callbacks.metrics import METRICS

    assert sorted(n for n in names if n.startswith("uma/")) == sorted(f"uma/{m}" for m in METRICS)
    assert "uma status" in capsys.readouterr().out


def test_without_the_extra_it_names_it_and_exits_2(tmp_path, monkeypatch, capsys):
    from uma_callbacks.cli import main

    monkeypatch.setitem(sys.modules, "wandb_workspaces", None)
    assert main(["dashboard", "wandb", "e/p", "--dry-run", str(tmp_path / "ws.json")]) == 2
    assert "uma-callbacks[workspaces]" in capsys.readouterr().err
    assert not (tmp_path / "ws.json").exists()


@pytest.mark.parametrize("path", ["noslash", "a/b/c", "/p", "e/ "])
def test_a_bad_entity_project_exits_2(path, tmp_path, capsys):
    from uma_callbacks.cli import main

    assert main(["dashboard", "wandb", path, "--dry-run", str(tmp_path / "ws.json")]) == 2
    assert "ENTITY/PROJECT" in capsys.readouterr().err

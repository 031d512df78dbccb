"""Native W&B charts (line series, landscape heatmap table, per-module bars), read back from offline run files."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.integrations.wandb_runfile import history_rows, run_file, settled_records
from tests.trainer_cases import tiny_lm, tiny_lm_dataset
from uma_callbacks.engine.journal import Journal

wandb = pytest.importorskip("wandb")


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline, its files under ``tmp_path/wb``; any run left open is finished."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "uma-test")
    (tmp_path / "wb").mkdir()
    wandb.teardown()  # wandb caches settings (WANDB_DIR) per process: start clean
    yield tmp_path / "wb"
    if wandb.run is not None:
        wandb.finish()
    wandb.teardown()


def _visualize(records) -> dict[str, dict]:
    """``{chart key: panel config}`` from the run's config updates (``_wandb.visualize.<key>``)."""
    out = {}
    for record in records:
        if record.WhichOneof("record_type") == "config":
            for item in record.config.update:
                path = list(item.nested_key)
                if path[:2] == ["_wandb", "visualize"] and len(path) == 3:
                    out[path[2]] = json.loads(item.value_json)["panel_config"]
    return out


def _tables(folder: Path, rows: list[dict], key: str) -> dict[int, dict]:
    """``{uma/step: table JSON}`` of the chart ``key`` (its ``<key>_table`` entry, a file of the run)."""
    files = run_file(folder).parent / "files"
    out = {}
    for row in rows:
        path = row.get(f"{key}_table/path")
        if path is not None:
            assert row[f"{key}_table/_type"] == "table-file"
            out[row["uma/step"]] = json.loads((files / path).read_text())
    return out


def _column(table: dict, name: str) -> list:
    i = table["columns"].index(name)
    return [r[i] for r in table["data"]]


@pytest.mark.slow
def test_charts_of_hessian_fisher_landscape_read_back_from_the_run_file(tmp_path, offline_wandb):
    """Two saves of a tiny Qwen2 through the callback's own events: every chart equals the journal."""
    from uma_callbacks import UMACallback
    from uma_callbacks.metrics.fisher import FisherInformation
    from uma_callbacks.metrics.hessian import HessianSpectrum
    from uma_callbacks.metrics.landscape import LossLandscape

    metrics = [HessianSpectrum(top_k=2, hutchinson_samples=2), FisherInformation(top_k=2), LossLandscape(n_points=3)]
    cb = UMACallback(metrics=metrics, probe=tiny_lm_dataset(n=4), probe_size=4, trackers=["wandb"],
                     draw_figures=False, use_cache=False)  # fmt: skip
    args = SimpleNamespace(output_dir=str(tmp_path / "out"), report_to="none")
    model = tiny_lm()
    cb.on_train_begin(args, SimpleNamespace(global_step=0), None, model=model)
    for step in (3, 6):
        with torch.no_grad():  # another checkpoint: other values at each step
            for p in model.parameters():
                p.mul_(1.1)
        cb.on_save(args, SimpleNamespace(global_step=step), None, model=model)
    cb.on_train_end(args, SimpleNamespace(global_step=6), None, model=model)

    journal = Journal(tmp_path / "out" / "uma")
    results = {(r.step, r.metric): journal.load_result(r) for r in journal.records()}
    assert {(s, m) for s, m in results} == {(s, m) for s in (3, 6) for m in ("hessian", "fisher", "landscape")}
    assert all(r.status in ("ok", "partial") for r in results.values())  # partial: Hessian's 2-probe trace
    records = settled_records(offline_wandb, lambda rows: sum("uma/step" in r for r in rows) >= 6)
    rows = [r for r in history_rows(records) if "uma/step" in r]
    charts = _visualize(records)

    # top eigenvalues: one line per eigenvalue over the steps; the step-6 chart holds both steps
    for metric in ("hessian", "fisher"):
        key = f"uma/{metric}/charts/top_eigenvalues"
        assert charts[key]["panelDefId"] == "wandb/lineseries/v0"
        tables = _tables(offline_wandb, rows, key)
        assert sorted(tables) == [3, 6]
        table = tables[6]
        assert table["columns"] == ["step", "lineKey", "lineVal"]
        got = {(step, line): value for step, line, value in table["data"]}
        want = {
            (step, f"lambda_{i + 1}"): float(v)
            for step in (3, 6)
            for i, v in enumerate(results[(step, metric)].arrays["top_eigenvalues"])
        }
        assert got.keys() == want.keys() and len(want) == 4
        for point, value in want.items():
            assert got[point] == pytest.approx(value, rel=1e-12), point
        assert {s for s, _, _ in tables[3]["data"]} == {3}  # at step 3 only step 3 was there

    # the landscape grid: n_points^2 rows, equal to the grid, shown as a heatmap
    key = "uma/landscape/charts/grid"
    assert charts[key]["panelDefId"] == "wandb/confusion_matrix/v1"
    assert charts[key]["fieldSettings"] == {"Actual": "alpha", "Predicted": "beta", "nPredictions": "loss"}
    tables = _tables(offline_wandb, rows, key)
    for step in (3, 6):
        result = results[(step, "landscape")]
        table = tables[step]
        assert table["columns"] == ["alpha", "beta", "loss"] and len(table["data"]) == 9
        want = {
            (float(a), float(b)): float(result.arrays["grid_losses"][i][j])
            for i, a in enumerate(result.arrays["alphas"])
            for j, b in enumerate(result.arrays["betas"])
        }
        got = {(a, b): loss for a, b, loss in table["data"]}
        assert got.keys() == want.keys()
        for point, value in want.items():
            assert got[point] == pytest.approx(value, rel=1e-12), point

    # per-module values: one bar per module, equal to the logged layers/<module>/trace
    key = "uma/fisher/charts/layers/trace"
    assert charts[key]["panelDefId"] == "wandb/bar/v0"
    tables = _tables(offline_wandb, rows, key)
    for step in (3, 6):
        row = next(r for r in rows if r["uma/step"] == step and "uma/fisher/trace" in r)
        logged = {
            k.split("/", 3)[3].rsplit("/", 1)[0]: v
            for k, v in row.items()
            if k.startswith("uma/fisher/layers/") and k.endswith("/trace")
        }
        table = tables[step]
        assert table["columns"] == ["module", "value"]
        assert dict(zip(_column(table, "module"), _column(table, "value"))) == logged
        assert len(logged) >= 2

    # no chart key meets a scalar key: under charts/ the history holds only the charts' tables
    assert all("_table/" in k for r in rows for k in r if "/charts/" in k)


def _sink_and_records(tmp_path):
    """A journal with one real hessian record at steps 3 and 6 (top_k=2), and an offline WandbSink."""
    from tests.cases import qwen2_case
    from uma_callbacks.core.records import Record
    from uma_callbacks.integrations.wandb import WandbSink
    from uma_callbacks.metrics.hessian import HessianSpectrum

    model, batches, loss_fn = qwen2_case()
    journal = Journal(tmp_path / "uma")
    metric = HessianSpectrum(top_k=2, hutchinson_samples=2)
    out = []
    for step in (3, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.05)
        result = metric.compute(model, batches, loss_fn)
        record = Record(step=step, metric="hessian", status="ok", scalars=dict(result.scalars),
                        meta={"config": metric.config()}, run="r1")  # fmt: skip
        journal.write_result(record, result)
        journal.append(record)
        out.append(record)
    return WandbSink(project="uma-test"), journal, out


def test_a_resumed_sink_draws_the_whole_series_from_the_journal_once_per_step(tmp_path, offline_wandb):
    """A fresh sink given only step 6 draws steps 3 and 6 (the journal's); a replay adds no chart."""
    sink, journal, (first, second) = _sink_and_records(tmp_path)
    journal.append(dataclasses.replace(first, step=4, run="r2"))  # another training's record: not in the series
    other = {**first.meta["config"], "top_k": 3}
    journal.append(dataclasses.replace(first, step=5, meta={"config": other}))  # another configuration: not either
    sink.log_record(second, journal.root)
    sink.log_record(second, journal.root)  # the once-per-(run, step, key) rule
    sink.finish()
    records = settled_records(offline_wandb, lambda rows: any("uma/step" in r for r in rows))
    rows = [r for r in history_rows(records) if "uma/step" in r]
    assert len(rows) == 1
    table = _tables(offline_wandb, rows, "uma/hessian/charts/top_eigenvalues")[6]
    got = {(s, line): v for s, line, v in table["data"]}
    for record in (first, second):
        values = journal.load_result(record).arrays["top_eigenvalues"]
        for i, value in enumerate(values):
            assert got[(record.step, f"lambda_{i + 1}")] == pytest.approx(float(value), rel=1e-12)
    assert len(got) == 4


def test_a_chart_that_cannot_be_built_leaves_the_scalars_logged(tmp_path, offline_wandb):
    """NaN eigenvalues, a missing array, a damaged result file: no chart, every scalar still there."""
    import math

    from uma_callbacks.core.records import Record

    sink, journal, (first, second) = _sink_and_records(tmp_path)
    nan = dataclasses.replace(second, step=9, files=[], file_ids={})  # no result file: no array
    folder = journal.root / "step-12"
    folder.mkdir()
    (folder / "hessian.json").write_text(json.dumps({"name": "hessian", "arrays": {"top_eigenvalues": [None, None]}}))
    all_nan = Record(step=12, metric="hessian", status="ok", scalars={"trace": 1.5, "layers/a/x": math.nan},
                     files=["step-12/hessian.json"], run="r1")  # fmt: skip
    (journal.root / "step-15").mkdir()
    (journal.root / "step-15" / "hessian.json").write_text('{"arrays": {"top_eigenvalues": [[1, 2], "x"]')
    broken = Record(step=15, metric="hessian", status="ok", scalars={"trace": 2.5}, files=["step-15/hessian.json"], run="r1")
    for record in (nan, all_nan, broken):
        sink.log_record(record, journal.root)
    sink.finish()
    records = settled_records(offline_wandb, lambda rows: sum("uma/step" in r for r in rows) >= 3)
    rows = {r["uma/step"]: r for r in history_rows(records) if "uma/step" in r}
    assert sorted(rows) == [9, 12, 15]
    for step, record in ((9, nan), (12, all_nan), (15, broken)):
        for key, value in record.log_values().items():
            assert rows[step][key] == pytest.approx(value, rel=1e-12)
        assert not [k for k in rows[step] if "/charts/" in k]


def test_a_chart_wandb_refuses_leaves_the_row(tmp_path, offline_wandb, monkeypatch, caplog):
    """W&B raising on a chart at log time: the same row is logged again without the charts."""
    from uma_callbacks.integrations import wandb_charts

    sink, journal, (first, _second) = _sink_and_records(tmp_path)

    class Refused:
        """An object W&B cannot log."""

    monkeypatch.setattr(wandb_charts, "record_charts", lambda *a, **k: {"uma/hessian/charts/top_eigenvalues": Refused()})
    monkeypatch.setattr("uma_callbacks.integrations.wandb.record_charts", wandb_charts.record_charts)
    with caplog.at_level(logging.DEBUG, logger="uma_callbacks.integrations.wandb"):
        sink.log_record(first, journal.root)
    assert any("charts of hessian at step 3 not logged" in r.getMessage() for r in caplog.records)
    sink.finish()
    records = settled_records(offline_wandb, lambda rows: any("uma/step" in r for r in rows))
    rows = [r for r in history_rows(records) if "uma/step" in r]
    assert len(rows) == 1 and not [k for k in rows[0] if "/charts/" in k]
    for key, value in first.log_values().items():
        assert rows[0][key] == pytest.approx(value, rel=1e-12)

"""WandbSink against real offline W&B runs, read back from the ``.wandb`` run file."""

from __future__ import annotations

import logging
import sys

import pytest

from tests.integrations.wandb_runfile import artifacts, history_rows, metric_definitions, settled_records
from tests.mlflow_store import mlflow_store
from tests.trainer_cases import run_trainer, tiny_lm_dataset
from uma_callbacks.core.records import Record
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


def _uma_rows(rows):
    return [r for r in rows if "uma/step" in r]


@pytest.mark.slow
def test_trainer_report_to_wandb_and_mlflow_at_once(tmp_path, offline_wandb, monkeypatch):
    """One real Trainer run, ``report_to=["wandb", "mlflow"]``: both runs joined, both complete."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from uma_callbacks import UMACallback

    uri = mlflow_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "uma-both")
    cb = UMACallback(metrics=["gradient_flow", "fisher"], probe=tiny_lm_dataset(n=8), probe_size=8)
    run_trainer(tmp_path / "out", callbacks=[cb], report_to=["wandb", "mlflow"])
    assert sorted(s.name for s in cb.sinks) == ["mlflow", "wandb"]
    wandb_sink = next(s for s in cb.sinks if s.name == "wandb")
    assert not wandb_sink.owns_run  # joined the Trainer's run
    wandb.finish()  # flushes the run file (the Trainer leaves its run open)
    journal = {(r.step, r.metric): r for r in Journal(tmp_path / "out" / "uma").records()}
    records = settled_records(offline_wandb, lambda rows: len(_uma_rows(rows)) >= len(journal))
    rows = history_rows(records)
    assert sorted(journal) == [(3, "fisher"), (3, "gradient_flow"), (6, "fisher"), (6, "gradient_flow")]
    uma = _uma_rows(rows)
    # one row per record, each on the checkpoint's own step, values equal to the journal
    assert sorted((r["uma/step"], m) for r in uma for m in ("fisher", "gradient_flow") if f"uma/{m}/seconds" in r) == sorted(
        journal
    )
    for row in uma:
        for (step, metric), rec in journal.items():
            if step == row["uma/step"] and f"uma/{metric}/seconds" in row:
                for key, value in rec.log_values().items():
                    assert row[key] == pytest.approx(value, rel=1e-12)
    # the Trainer's own rows are there too (same run)
    assert any("train/loss" in r for r in rows)
    # figures and the per-module table
    for step in (3, 6):
        step_rows = [r for r in uma if r["uma/step"] == step]
        keys = {k for r in step_rows for k in r}
        assert "uma/gradient_flow/figures/layers/_type" in keys
        assert "uma/fisher/figures/spectrum/_type" in keys
        assert {r.get("uma/gradient_flow/figures/layers/_type") for r in step_rows} >= {"image-file"}
        assert "uma/gradient_flow/modules/_type" in keys
    # uma/* bound to uma/step
    defs = metric_definitions(records)
    assert any(d.glob_name == "uma/*" and d.step_metric == "uma/step" for d in defs)
    assert any(d.name == "uma/gradient_flow/total_norm" and d.step_metric == "uma/step" for d in defs)
    names = {a.name for a in artifacts(records)}
    for step in (3, 6):
        for metric in ("fisher", "gradient_flow"):
            assert any(n.endswith(f"-{metric}-step-{step}") for n in names), names
    # never the step= argument: no history row carries a uma value without uma/step
    assert not [r for r in rows if any(k.startswith("uma/") for k in r) and "uma/step" not in r]

    # MLflow: the Trainer's run, one point per checkpoint, artifacts per step
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("uma-both").experiment_id])
    assert len(runs) == 1
    run_id = runs[0].info.run_id
    for metric, key in (("gradient_flow", "total_norm"), ("fisher", "trace")):
        history = client.get_metric_history(run_id, f"uma/{metric}/{key}")
        assert [(m.step, m.value) for m in history] == [(s, journal[(s, metric)].scalars[key]) for s in (3, 6)]
    artifacts_6 = {f.path for f in client.list_artifacts(run_id, "uma/step-6")}
    assert {"uma/step-6/gradient_flow.json", "uma/step-6/fisher.json", "uma/step-6/gradient_flow-layers.png"} <= artifacts_6


def _record(tmp_path, step=3):
    folder = tmp_path / "uma" / f"step-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gradient_flow.json").write_text("{}")
    return Record(
        step=step,
        metric="gradient_flow",
        status="ok",
        scalars={"total_norm": 2.5, "layers/model.fc/norm": 1.5, "params/model.fc.weight/norm": 1.0},
        meta={"seconds": 0.1},
        files=[f"step-{step}/gradient_flow.json"],
        cache_key=f"k{step}",
    )


def test_same_record_twice_adds_one_row_own_run(tmp_path, offline_wandb):
    from uma_callbacks.engine.delivery import deliver
    from uma_callbacks.integrations.wandb import WandbSink

    journal = Journal(tmp_path / "uma")
    sink = WandbSink(project="uma-test")
    rec = _record(tmp_path)
    journal.append(rec)
    assert deliver(journal, sink, [rec]) == 1
    assert deliver(journal, sink, [rec]) == 0  # the journal's delivery log
    sink.log_record(rec, journal.root)  # the in-process (step, key) set
    sink.log_params({"probe_fingerprint": "abc"})
    assert sink.owns_run
    sink.finish()
    records = settled_records(offline_wandb, lambda rows: len(_uma_rows(rows)) >= 1)
    uma = _uma_rows(history_rows(records))
    assert len(uma) == 1 and uma[0]["uma/step"] == 3 and uma[0]["uma/gradient_flow/total_norm"] == 2.5
    assert uma[0]["uma/gradient_flow/modules/nrows"] == 1  # one layers/<module>/<scalar> entry
    assert len([a for a in artifacts(records) if a.type == "uma-results"]) == 1
    configs = [r.config for r in records if r.WhichOneof("record_type") == "config"]
    assert any(item.key == "uma.probe_fingerprint" for c in configs for item in c.update)


def test_missing_wandb_fails_at_construction_naming_the_extra(monkeypatch):
    from uma_callbacks import UMACallback
    from uma_callbacks.integrations.wandb import WandbSink

    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'uma-callbacks\[wandb\]'"):
        UMACallback(metrics=["gradient_flow"], trackers=["wandb"])
    with pytest.raises(ModuleNotFoundError, match=r"uma-callbacks\[wandb\]"):
        WandbSink()


def test_report_to_resolution_none_one_both_or_own_sink(tmp_path):
    from types import SimpleNamespace

    from uma_callbacks import UMACallback
    from uma_callbacks.integrations.base import MemorySink
    from uma_callbacks.triggers.trainer import trainer_sinks

    def resolve(report_to, trackers=None):
        cb = UMACallback(metrics=["gradient_flow"], trackers=trackers)
        return [s.name for s in trainer_sinks(SimpleNamespace(report_to=report_to), cb.config.trackers, tmp_path)[0]]

    assert resolve("none") == []  # journal only
    assert resolve(["tensorboard"]) == ["tensorboard"]  # a tracker with a sink joins the Trainer's
    assert resolve(["clearml", "comet_ml"]) == []  # trackers we do not know are the Trainer's business
    assert resolve(["mlflow", "wandb"], trackers=[]) == []  # trackers=[] overrides report_to
    own = MemorySink()
    assert resolve("none", trackers=[own]) == ["memory"]
    assert not list(tmp_path.glob("*.db")) and not (tmp_path / "wandb").exists()


def test_unknown_tracker_name_is_refused():
    from uma_callbacks import UMACallback
    from uma_callbacks.integrations import make_sink

    with pytest.raises(ValueError, match="trackers"):
        UMACallback(trackers=["wandbb"])
    with pytest.raises(ValueError, match="trackers"):
        make_sink("neptune")


def test_wandb_init_failure_warns_once_and_keeps_the_journal(tmp_path, offline_wandb, monkeypatch, caplog):
    """The callback's own events (no Trainer needed): start fails, two checkpoints, one warning."""
    from types import SimpleNamespace

    from tests.trainer_cases import tiny_lm
    from uma_callbacks import UMACallback

    def broken_init(*args, **kwargs):
        raise wandb.errors.CommError("no route to api.wandb.ai")

    monkeypatch.setattr(wandb, "init", broken_init)
    cb = UMACallback(metrics=["gradient_flow"], probe=tiny_lm_dataset(n=8), probe_size=8, trackers=["wandb"],
                     draw_figures=False, use_cache=False)  # fmt: skip
    args = SimpleNamespace(output_dir=str(tmp_path / "out"), report_to="none")
    model = tiny_lm()
    with caplog.at_level(logging.WARNING, logger="uma_callbacks"):
        cb.on_train_begin(args, SimpleNamespace(global_step=0), None, model=model)
        for step in (3, 6):
            cb.on_save(args, SimpleNamespace(global_step=step), None, model=model)
        cb.on_train_end(args, SimpleNamespace(global_step=6), None, model=model)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "wandb" in r.getMessage()]
    assert len(warnings) == 1, [w.getMessage() for w in warnings]
    assert "no route" in warnings[0].getMessage()
    assert [(r.step, r.status) for r in Journal(tmp_path / "out" / "uma").records()] == [(3, "ok"), (6, "ok")]


def test_a_record_csv_becomes_a_bounded_table_and_a_hostile_one_is_left_out(tmp_path, caplog):
    """Numbers as floats, empty cells as None; a ragged file or one over the size bound is left
    out with a warning (it still travels in the artifact), never raised."""
    wandb = pytest.importorskip("wandb")
    from uma_callbacks.integrations import wandb as sink_module

    good = tmp_path / "influence.csv"
    good.write_text("sample,self_influence,text\n0,1.5,to be\n1,,or not\n")
    table = sink_module._csv_table(wandb, good)
    assert table.columns == ["sample", "self_influence", "text"]
    assert table.data == [[0.0, 1.5, "to be"], [1.0, None, "or not"]]
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("a,b\n1,2,3\n")
    huge = tmp_path / "huge.csv"
    huge.write_text("a\n" + "1\n" * (sink_module._CSV_MAX_ROWS + 1))
    with caplog.at_level("WARNING"):
        assert sink_module._csv_table(wandb, ragged) is None
        assert sink_module._csv_table(wandb, huge) is None
    assert "ragged.csv" in caplog.text and "huge.csv" in caplog.text

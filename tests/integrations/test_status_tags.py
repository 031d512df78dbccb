"""Status tags follow the latest outcome, in a real MLflow SQLite store and a W&B offline run file.

An error then a good rerun (a new process joining the run, as ``uma backfill`` does) leaves no
stale ``error`` tag, for a metric and for a checkpoint that could not be loaded; an expected
skip (no previous checkpoint yet) is shown as a skip, never as an error.
"""

from __future__ import annotations

import json

import pytest

from tests.integrations.wandb_runfile import read_records, run_file
from tests.mlflow_store import mlflow_store
from uma_callbacks.core.records import Record
from uma_callbacks.engine.delivery import deliver
from uma_callbacks.engine.journal import Journal

SKIP = "no previous checkpoint yet: CheckpointInterpolation needs its weights"


def _record(root, step, metric, status="ok", message="boom", **scalars):
    record = Record(step=step, metric=metric, status=status, scalars=scalars or ({"x": 1.0 + step} if status == "ok" else {}),
                    meta={"seconds": 0.1}, cache_key=f"{metric}-{step}-{status}")  # fmt: skip
    if status != "ok":
        kind = "MetricSkipped" if status == "skipped" else "ValueError"
        record.error = {"type": kind, "message": message, "traceback": ""}
    return record


def _failed_then_rerun(root):
    """A backfill whose checkpoints could not be loaded (and one metric error), then the good rerun."""
    failed = [
        _record(root, 3, "checkpoint", "error", "checkpoint holds weights the model does not have: ['bert.x']"),
        _record(root, 6, "checkpoint", "error", "checkpoint holds weights the model does not have: ['bert.x']"),
        _record(root, 6, "fisher", "error", "the rank was lost"),
    ]
    rerun = [_record(root, 3, "fisher"), _record(root, 6, "fisher")]
    skips = [_record(root, 3, "interpolation", "skipped", SKIP), _record(root, 6, "interpolation", x=0.5)]
    return failed, rerun, skips


def test_mlflow_error_then_good_rerun_leaves_no_stale_error_and_a_skip_is_no_error(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from uma_callbacks.integrations.mlflow import MLflowSink

    store = mlflow_store(tmp_path)
    journal = Journal(tmp_path / "uma")
    failed, rerun, skips = _failed_then_rerun(journal.root)
    sink = MLflowSink(tracking_uri=store)
    deliver(journal, sink, failed)
    tags = MlflowClient(store).get_run(sink.run_id()).data.tags
    assert (tags["uma.checkpoint.status"], tags["uma.checkpoint.status_step"]) == ("error", "6")
    assert tags["uma.checkpoint.error"].startswith("step 6: checkpoint holds weights")
    assert (tags["uma.fisher.status"], tags["uma.fisher.error"]) == ("error", "step 6: the rank was lost")

    # the rerun: another process joins the run and reads what it shows
    again = MLflowSink(run_id=sink.run_id(), tracking_uri=store)
    deliver(journal, again, rerun[:1])
    tags = MlflowClient(store).get_run(sink.run_id()).data.tags
    assert tags["uma.checkpoint.status"] == "error"  # step 6 still failed: a value at 3 does not hide it
    deliver(journal, again, rerun[1:] + skips)
    tags = MlflowClient(store).get_run(sink.run_id()).data.tags
    assert (tags["uma.checkpoint.status"], tags["uma.checkpoint.status_step"]) == ("ok", "6")
    assert (tags["uma.fisher.status"], tags["uma.fisher.status_step"]) == ("ok", "6")
    assert "uma.checkpoint.error" not in tags and "uma.fisher.error" not in tags
    # the first-checkpoint skip: shown apart, never as an error
    assert (tags["uma.interpolation.status"], tags["uma.interpolation.status_step"]) == ("ok", "6")
    assert "uma.interpolation.error" not in tags
    assert tags["uma.interpolation.skipped"] == f"step 3: {SKIP}"
    # a newer failure is shown again, with its error
    deliver(journal, again, [_record(journal.root, 9, "fisher", "error", "diverged")])
    tags = MlflowClient(store).get_run(sink.run_id()).data.tags
    assert (tags["uma.fisher.status"], tags["uma.fisher.error"]) == ("error", "step 9: diverged")


def _summary(records):
    """The run's final summary from its run file: updates and removals applied in order."""
    out = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            for item in record.summary.remove:
                out.pop(item.key or "/".join(item.nested_key), None)
    return out


def test_wandb_error_then_good_rerun_leaves_no_stale_error_and_a_skip_is_no_error(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from uma_callbacks.integrations.wandb import WandbSink

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb.teardown()
    try:
        journal = Journal(tmp_path / "uma")
        failed, rerun, skips = _failed_then_rerun(journal.root)
        sink = WandbSink(project="uma-status")
        deliver(journal, sink, failed)
        deliver(journal, sink, rerun + skips)
        sink.finish()
    finally:
        wandb.teardown()
    summary = _summary(read_records(run_file(tmp_path / "wb")))
    assert (summary["uma/checkpoint/status"], summary["uma/checkpoint/status_step"]) == ("ok", 6)
    assert (summary["uma/fisher/status"], summary["uma/fisher/status_step"]) == ("ok", 6)
    assert "uma/checkpoint/error" not in summary and "uma/fisher/error" not in summary
    assert summary["uma/interpolation/status"] == "ok"
    assert "uma/interpolation/error" not in summary
    assert summary["uma/interpolation/skipped"] == f"step 3: {SKIP}"


def test_wandb_keeps_a_backfills_config_folder_and_both_configs_params(tmp_path, monkeypatch):
    """The live fisher at step 4, then a backfill's other config: the artifact files keep their
    journal folder (``step-4/fisher-<hash>/fisher.json`` beside ``step-4/fisher.json``), and the
    backfill's config is a param of its own beside the live one, which is unchanged."""
    wandb = pytest.importorskip("wandb")
    from uma_callbacks.integrations.base import value_hash
    from uma_callbacks.integrations.wandb import WandbSink

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    journal = Journal(tmp_path / "uma")
    live_config, other_config = {"metric": "fisher", "top_k": 10}, {"metric": "fisher", "top_k": 2}
    digest = value_hash(other_config)
    records = []
    for folder, config in (("step-4", live_config), (f"step-4/fisher-{digest}", other_config)):
        (journal.root / folder).mkdir(parents=True, exist_ok=True)
        (journal.root / folder / "fisher.json").write_text(json.dumps(config))
        record = _record(journal.root, 4, "fisher", trace=float(config["top_k"]))
        record.meta["config"], record.files, record.cache_key = config, [f"{folder}/fisher.json"], folder
        journal.append(record)
        records.append(record)
    wandb.teardown()
    try:
        sink = WandbSink(project="uma-apart")
        sink.log_params({"fisher.config": live_config, "probe_fingerprint": "abc"})
        deliver(journal, sink, records[:1])
        sink.log_params({"fisher.config": other_config, "probe_fingerprint": "abc"})  # a backfill's session
        deliver(journal, sink, records[1:])
        sink.finish()
    finally:
        wandb.teardown()
    run = read_records(run_file(tmp_path / "wb"))
    files = {e.path for r in run if r.WhichOneof("record_type") == "artifact" for e in r.artifact.manifest.contents}
    assert files == {"step-4/fisher.json", f"step-4/fisher-{digest}/fisher.json"}
    config = {}
    for r in run:
        if r.WhichOneof("record_type") == "config":
            for item in r.config.update:
                config.setdefault(item.key, []).append(json.loads(item.value_json))
    assert config["uma.fisher.config"] == [live_config]  # set once, never changed
    assert config[f"uma.fisher-{digest}.config"] == [other_config]
    assert config["uma.probe_fingerprint"] == ["abc"]


def test_mlflow_variant_folders_and_a_param_logged_meanwhile_by_another_process(tmp_path, caplog):
    """A second training's files (``step-3/gradient_flow-run-<run>/``) keep their folder; a param
    another process logged between this sink's read and its write is kept, this value goes under
    its config-hash key, and nothing of MLflow's refusal reaches the log."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from uma_callbacks.integrations.base import value_hash
    from uma_callbacks.integrations.mlflow import MLflowSink

    store = mlflow_store(tmp_path)
    journal = Journal(tmp_path / "uma")
    sink = MLflowSink(tracking_uri=store)
    sink.log_params({"probe_fingerprint": "abc"})  # the sink has read the run's params now
    client = MlflowClient(store)
    theirs, mine = {"metric": "fisher", "top_k": 10}, {"metric": "fisher", "top_k": 2}
    client.log_param(sink.run_id(), "uma.fisher.config", str(theirs))  # another process, meanwhile
    with caplog.at_level("DEBUG"):
        sink.log_params({"fisher.config": mine, "probe_fingerprint": "abc"})
    params = client.get_run(sink.run_id()).data.params
    assert params["uma.fisher.config"] == str(theirs)
    assert params[f"uma.fisher-{value_hash(mine)}.config"] == str(mine)
    assert "Changing param values" not in caplog.text and "Correct Example" not in caplog.text

    folder = journal.root / "step-3" / "gradient_flow-run-0123456789ab"
    folder.mkdir(parents=True)
    (folder / "gradient_flow.json").write_text("{}")
    record = _record(journal.root, 3, "gradient_flow")
    record.files = ["step-3/gradient_flow-run-0123456789ab/gradient_flow.json"]
    deliver(journal, sink, [record])
    listed = [a.path for a in client.list_artifacts(sink.run_id(), "uma/step-3/gradient_flow-run-0123456789ab")]
    assert listed == ["uma/step-3/gradient_flow-run-0123456789ab/gradient_flow.json"]
    assert not [a for a in client.list_artifacts(sink.run_id(), "uma/step-3") if not a.is_dir]

"""Offline backfill end to end: a real Trainer run's folder, MLflow, reruns, kill -9, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.mlflow_store import mlflow_store
from tests.test_checkpoints import fake_trainer_run, tiny_model
from tests.trainer_cases import run_trainer, tiny_lm_dataset
from uma_callbacks.engine.journal import Journal
from uma_callbacks.engine.probe import Probe, load_probe, save_probe
from uma_callbacks.triggers.backfill import backfill

pytestmark = pytest.mark.slow
mlflow = pytest.importorskip("mlflow")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Trainer run (checkpoints at steps 3 and 6) measured live with gradient_flow into MLflow."""
    from uma_callbacks import UMACallback

    root = tmp_path_factory.mktemp("trained")
    uri = mlflow_store(root)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        cb = UMACallback(metrics=["gradient_flow"], probe=tiny_lm_dataset(n=8, seed=1), probe_size=8,
                         trackers=["mlflow"], draw_figures=False)
        run_trainer(root / "run", callbacks=[cb])
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    save_probe(cb.probe, root / "run" / "uma")  # what the callback will do at train begin
    return {"run": root / "run", "uri": uri, "run_id": cb.sinks[0].run_id(), "cb": cb}


def _history(uri, run_id, key):
    from mlflow.tracking import MlflowClient

    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key)]


def test_backfill_adds_a_new_metric_at_every_checkpoint_step_and_rerun_adds_nothing(trained):
    kwargs = dict(metrics=["fisher"], mlflow_run_id=trained["run_id"], tracking_uri=trained["uri"],
                  draw_figures=False, progress=False)
    first = backfill(trained["run"], **kwargs)
    assert first.ok, first.describe()
    assert [c.step for c in first.checkpoints] == [3, 6]
    assert first.computed == 3  # fisher at 3 and 6, trajectory at 6
    history = _history(trained["uri"], trained["run_id"], "uma/fisher/trace")
    assert [s for s, _ in history] == [3, 6]
    traj = _history(trained["uri"], trained["run_id"], "uma/trajectory/distance_from_first")
    assert [s for s, _ in traj] == [6] and traj[0][1] > 0
    again = backfill(trained["run"], **kwargs)
    assert again.computed == 0 and again.cached == 3  # nothing measured again: every value from the journal
    assert _history(trained["uri"], trained["run_id"], "uma/fisher/trace") == history
    # the live gradient_flow records are found by weights fingerprint: loading is bit exact
    live = backfill(trained["run"], metrics=["gradient_flow"], trajectory=False, draw_figures=False, progress=False)
    assert live.computed == 0 and live.cached == 2


def test_backfill_values_agree_with_the_live_callback(trained, tmp_path):
    summary = backfill(trained["run"], metrics=["gradient_flow"], trajectory=False, use_cache=False,
                       output_dir=tmp_path / "fresh", draw_figures=False, progress=False)
    assert summary.computed == 2
    live = {r.step: r for r in trained["cb"].records}
    for record in summary.records:
        assert record.probe == trained["cb"].probe.fingerprint
        ref = live[record.step].scalars
        assert set(ref) == set(record.scalars)
        for key, value in ref.items():
            assert record.scalars[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_probe_mismatch_is_a_clear_error(trained):
    other = Probe.from_dataset(tiny_lm_dataset(n=8, seed=7), 8)
    with pytest.raises(ValueError, match="probe fingerprint"):
        backfill(trained["run"], metrics=["fisher"], probe=other, progress=False)
    assert load_probe(trained["run"] / "uma").fingerprint == trained["cb"].probe.fingerprint


_SLOW_SCRIPT = """
import sys, time
from uma_callbacks.triggers.backfill import backfill
from uma_callbacks.metrics import FisherInformation

class SlowFisher(FisherInformation):
    def _compute(self, ctx):
        time.sleep(1.0)
        return super()._compute(ctx)

s = backfill(sys.argv[1], metrics=[SlowFisher(top_k=2)], mlflow_run_id=sys.argv[2], tracking_uri=sys.argv[3],
             trajectory=False, draw_figures=False, progress=False)
print("DONE", s.computed, s.cached)
"""


def test_kill_9_halfway_then_rerun_completes_without_duplicates(tmp_path):
    from mlflow.tracking import MlflowClient

    run = fake_trainer_run(tmp_path / "run", steps=(2, 4, 6))
    save_probe(Probe.from_dataset(tiny_lm_dataset(n=6, seed=2), 6), run / "uma")
    uri = mlflow_store(tmp_path)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("bf")).info.run_id
    script = tmp_path / "slow.py"
    script.write_text(textwrap.dedent(_SLOW_SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(script), str(run), run_id, uri]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    journal = run / "uma" / "journal.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (journal.exists() and journal.read_text().count("\n") >= 1):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert journal.read_text().count("\n") < 3  # killed halfway
    # the rerun, in this process: the same metric config (name and settings; SlowFisher only
    # sleeps), so the same cache keys
    from uma_callbacks.metrics import FisherInformation

    again = backfill(run, metrics=[FisherInformation(top_k=2)], mlflow_run_id=run_id, tracking_uri=uri,
                     trajectory=False, draw_figures=False, progress=False)
    assert again.ok and again.cached >= 1 and again.computed + again.cached == 3
    records = [r for r in Journal(run / "uma").records() if r.metric == "fisher" and r.status == "ok"]
    assert sorted(r.step for r in records) == [2, 4, 6]
    steps = [m.step for m in client.get_metric_history(run_id, "uma/fisher/trace")]
    assert sorted(steps) == [2, 4, 6]


def test_bad_checkpoints_become_error_records_and_the_others_are_processed(tmp_path):
    run = fake_trainer_run(tmp_path / "run", steps=(1, 2, 3))
    (run / "checkpoint-2" / "model.safetensors").write_bytes(b"not a safetensors file" * 4)
    other = run / "checkpoint-4"
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=32)).save_pretrained(other)
    (other / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    probe = Probe.from_dataset(tiny_lm_dataset(n=4, seed=3), 4)
    summary = backfill(run, metrics=["gradient_flow"], probe=probe, draw_figures=False, progress=False)
    assert not summary.ok
    reasons = {step: reason for _, step, reason in summary.errors}
    assert set(reasons) == {2, 4}
    assert "cannot read weights" in reasons[2]
    assert "architecture" in reasons[4] and "gpt2" in reasons[4]
    ok = sorted(r.step for r in summary.records if r.metric == "gradient_flow" and r.status == "ok")
    assert ok == [1, 3]
    journal_errors = [r for r in Journal(run / "uma").records() if r.metric == "checkpoint"]
    assert sorted(r.step for r in journal_errors) == [2, 4]
    assert "error at step 2" in summary.describe()


def test_model_list_with_model_factory_and_no_saved_probe(tmp_path):
    run = fake_trainer_run(tmp_path / "run", steps=(5,))
    with pytest.raises(ValueError, match="no saved probe"):
        backfill(run, metrics=["gradient_flow"], progress=False)
    probe = Probe.from_dataset(tiny_lm_dataset(n=4), 4)
    built = []

    def factory(folder, config):
        built.append(folder.name)
        return tiny_model()

    summary = backfill([run / "checkpoint-5"], metrics=["gradient_flow"], probe=probe, model_factory=factory,
                       draw_figures=False, progress=False)
    assert summary.ok and built == ["checkpoint-5"] and summary.records[0].step == 5


def test_unusable_folders_are_error_records_and_a_duplicate_step_is_measured_once(tmp_path):
    import shutil

    from tests.test_checkpoints import fake_trainer_run
    from tests.trainer_cases import tiny_lm_dataset
    from uma_callbacks.engine.probe import Probe, save_probe

    run = fake_trainer_run(tmp_path / "run", steps=(1, 2))
    shutil.copytree(run / "checkpoint-2", run / "checkpoint-02")  # a second folder claiming step 2
    (run / "checkpoint-3").mkdir()
    (run / "checkpoint-3" / "trainer_state.json").write_text("{not json")
    (run / "loop").symlink_to(run / "loop")
    save_probe(Probe.from_dataset(tiny_lm_dataset(n=4, seed=5), 4), run / "uma")
    summary = backfill(run, metrics=["gradient_flow"], trajectory=False, draw_figures=False, progress=False)
    reasons = {Path(path).name: reason for path, _, reason in summary.errors}
    # of two folders on step 2, the one named for it is measured
    assert set(reasons) == {"checkpoint-3", "loop", "checkpoint-02"}, summary.describe()
    assert "not readable JSON" in reasons["checkpoint-3"] and "loop" in reasons["loop"]
    assert "claims step 2" in reasons["checkpoint-02"]
    assert sorted(r.step for r in summary.records if r.metric == "gradient_flow") == [1, 2]
    errors = [r for r in summary.records if r.metric == "checkpoint"]
    assert len(errors) == 3 and all(r.status == "error" for r in errors)
    assert not summary.ok

"""Issue 29, identity: records belong to the training run that made them.

Real Trainer runs on a one-layer Qwen2 (hidden 16), a real MLflow SQLite store read back
with ``MlflowClient``:

- a second, fresh run in the same ``output_dir`` gets only its own records in its own
  MLflow run (it used to get the first run's, at steps it never reached);
- ``resume_from_checkpoint`` continues the same uma run and the same MLflow run;
- a real ``kill -9`` in the middle of a save, then a resume from that checkpoint: the
  metrics the save left unmeasured are measured on the checkpoint's weights at resume and
  logged at the checkpoint's step, in the same MLflow run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.mlflow_store import mlflow_store
from tests.trainer_cases import tiny_lm, tiny_lm_dataset, training_args
from uma_callbacks import UMACallback
from uma_callbacks.core.records import Record
from uma_callbacks.engine.delivery import Delivery
from uma_callbacks.engine.journal import Journal, append_line
from uma_callbacks.metrics.base import ComputeContext, Metric, MetricResult

pytestmark = pytest.mark.slow
mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = "uma-callbacks"  # the experiment MLflowSink opens its runs in


class WeightSum(Metric):
    """The sum of every parameter: a cheap function of the weights alone."""

    name = "weight_sum"
    needs_grad = False

    def _compute(self, ctx: ComputeContext) -> MetricResult:
        with torch.no_grad():
            total = sum(p.detach().double().sum() for p in ctx.model.parameters())
        return MetricResult(self.name, scalars={"value": float(total)})


class WeightNorm(Metric):
    """The squared norm of every parameter; with ``UMA_TEST_KILL_AT=<k>`` in the environment
    it kills its own process (SIGKILL) at its k-th call instead: a ``kill -9`` mid-save."""

    name = "weight_norm"
    needs_grad = False

    def __init__(self) -> None:
        super().__init__()
        self._calls = 0

    def _compute(self, ctx: ComputeContext) -> MetricResult:
        self._calls += 1
        if str(self._calls) == os.environ.get("UMA_TEST_KILL_AT"):
            os.kill(os.getpid(), signal.SIGKILL)
        with torch.no_grad():
            total = sum(p.detach().double().pow(2).sum() for p in ctx.model.parameters())
        return MetricResult(self.name, scalars={"value": float(total)})


def _callback(**kwargs) -> UMACallback:
    return UMACallback(
        metrics=[WeightSum(), WeightNorm()], probe=tiny_lm_dataset(n=8, seed=1), probe_size=8,
        trackers=["mlflow"], draw_figures=False, **kwargs,
    )


def _train(out: Path, cb: UMACallback, resume: str | None = None, **kwargs):
    from transformers import Trainer

    trainer = Trainer(model=tiny_lm(), args=training_args(out, **kwargs), train_dataset=tiny_lm_dataset(),
                      callbacks=[cb])
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _runs(uri: str) -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id]) if experiment else []


def _steps(uri: str, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def _weights_of(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    uri = mlflow_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("UMA_TEST_KILL_AT", raising=False)
    return uri


def test_second_run_in_the_same_folder_gets_only_its_own_records(tmp_path, store):
    out = tmp_path / "out"
    first = _callback()
    _train(out, first, max_steps=4, save_steps=2, lr_scheduler_type="constant")
    second = _callback()
    _train(out, second, max_steps=2, save_steps=2, lr_scheduler_type="constant")  # the same again, to step 2
    # its step 2 has the first run's weights: a cache hit, which is the second run's record now
    assert [(r.step, r.status) for r in second.records] == [(2, "cached"), (2, "cached")]

    a, b = first.sinks[0].run_id(), second.sinks[0].run_id()
    assert a and b and a != b
    assert _steps(store, a, "uma/weight_sum/value") == [2, 4]
    assert _steps(store, b, "uma/weight_sum/value") == [2]  # never step 4: it stopped at 2
    # the value at step 2 is the second run's own, not the first run's
    ours = [r.scalars["value"] for r in second.records if r.metric == "weight_sum"]
    logged = MlflowClient(store).get_metric_history(b, "uma/weight_sum/value")
    assert [m.value for m in logged] == pytest.approx(ours)
    # every record carries the identity of the run that made it
    records = Journal(out / "uma").records()
    assert {r.run for r in records} == {first.session.run, second.session.run}
    assert first.session.run != second.session.run
    assert all(r.run == second.session.run for r in second.records)
    assert sorted((r.step, r.metric) for r in records if r.run == second.session.run) == [(2, "weight_norm"), (2, "weight_sum")]
    params = MlflowClient(store).get_run(b).data.params
    assert params["uma.run"] == second.session.run


def test_a_second_run_never_overwrites_the_first_runs_files(tmp_path, store):
    """Another training in the same folder, other weights at the same step: its result files go
    to ``step-<N>/<metric>-run-<run>/`` and the first run's files stay what its records say."""
    from uma_callbacks.integrations.base import uploadable_files

    out = tmp_path / "out"
    first = _callback()
    _train(out, first, max_steps=2, save_steps=2)
    second = _callback()
    _train(out, second, max_steps=2, save_steps=2, learning_rate=3e-2)  # other weights at step 2
    journal = Journal(out / "uma")
    records = [r for r in journal.records() if r.status == "ok"]
    assert {r.run for r in records} == {first.session.run, second.session.run}
    for record in records:  # every file each record names is still the one the journal wrote
        assert record.files and uploadable_files(journal.root, record) == [journal.root / f for f in record.files]
    paths = {r.run: set(r.files) for r in records}
    assert not paths[first.session.run] & paths[second.session.run]


def test_resume_continues_the_same_uma_run_and_the_same_mlflow_run(tmp_path, store):
    out = tmp_path / "out"
    first = _callback()
    _train(out, first, max_steps=4, save_steps=2)
    resumed = _callback()
    _train(out, resumed, resume=str(out / "checkpoint-4"), max_steps=6, save_steps=2)

    runs = _runs(store)
    assert len(runs) == 1  # no second MLflow run
    run_id = runs[0].info.run_id
    assert resumed.sinks[0].run_id() == first.sinks[0].run_id() == run_id
    assert resumed.session.run == first.session.run
    assert _steps(store, run_id, "uma/weight_sum/value") == [2, 4, 6]
    assert _steps(store, run_id, "uma/weight_norm/value") == [2, 4, 6]
    records = Journal(out / "uma").records()
    assert {r.run for r in records} == {first.session.run}
    # step 4 was measured completely before: the resume measures nothing again
    assert sorted((r.step, r.metric) for r in records) == sorted(
        (s, m) for s in (2, 4, 6) for m in ("weight_sum", "weight_norm")
    )


_KILLED_RUN = """
import sys
from pathlib import Path
from tests.reliability.test_run_identity import _callback, _train
_train(Path(sys.argv[1]), _callback(), max_steps=6, save_steps=2)
"""


def test_kill_9_mid_save_then_resume_measures_what_the_save_left(tmp_path, store):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "UMA_TEST_KILL_AT": "2", "OMP_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": store}
    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(_KILLED_RUN))
    MlflowClient(store).search_experiments()  # the store made (migrated) here, not in the killed process
    proc = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    before = Journal(out / "uma").records()
    # the save at step 4 was cut after its first metric: weight_norm at step 4 was never measured
    assert sorted((r.step, r.metric) for r in before) == [(2, "weight_norm"), (2, "weight_sum"), (4, "weight_sum")]
    runs = _runs(store)
    assert len(runs) == 1
    run_id = runs[0].info.run_id
    assert _steps(store, run_id, "uma/weight_norm/value") == [2]

    resumed = _callback()
    _train(out, resumed, resume=str(out / "checkpoint-4"), max_steps=6, save_steps=2)

    assert len(_runs(store)) == 1  # the killed run's MLflow run goes on
    assert resumed.sinks[0].run_id() == run_id
    assert _steps(store, run_id, "uma/weight_norm/value") == [2, 4, 6]
    assert _steps(store, run_id, "uma/weight_sum/value") == [2, 4, 6]
    # measured on checkpoint-4's weights, at step 4
    expected = sum(float(t.double().pow(2).sum()) for t in _weights_of(out / "checkpoint-4").values())
    at_4 = [m.value for m in MlflowClient(store).get_metric_history(run_id, "uma/weight_norm/value") if m.step == 4]
    assert at_4 == pytest.approx([expected], rel=1e-6)
    records = Journal(out / "uma").records()
    assert len({r.run for r in records}) == 1
    assert sorted((r.step, r.metric) for r in records) == sorted(
        (s, m) for s in (2, 4, 6) for m in ("weight_sum", "weight_norm")
    )  # each measured once


def test_records_without_a_run_read_back_and_uma_sync_keeps_them_to_themselves(tmp_path):
    """An older version's journal (no ``run`` field) still reads; it is one run of its own:
    ``uma sync`` replays it into the tracker run that already holds its records, never into
    a newer run's, and a newer run's replays never carry it."""
    from integrations.base import MemorySink

    journal = Journal(tmp_path / "uma")
    legacy = {"step": 2, "metric": "m", "status": "ok", "scalars": {"x": 1.0}, "cache_key": "k2"}
    append_line(journal.path, legacy)
    append_line(journal.path, {**legacy, "step": 4, "cache_key": "k4"})
    records = journal.records()
    assert [(r.step, r.run) for r in records] == [(2, ""), (4, "")]
    assert records[0].record_id == Record(step=2, metric="m", status="ok", cache_key="k2").record_id

    new = Record(step=2, metric="m", status="ok", scalars={"x": 9.0}, cache_key="k2", run="b" * 32)
    journal.append(new)
    assert new.record_id != records[0].record_id  # the same values in another run are another record

    class Sink(MemorySink):
        def __init__(self, run: str) -> None:
            super().__init__()
            self._run = run

        def run_id(self) -> str:
            return self._run

    # the live path of the new run replays only its own records
    live = Sink("tracker-b")
    Delivery(journal, [live], run="b" * 32).send_pending()
    assert [(r.step, r.scalars["x"]) for r in live.records] == [(2, 9.0)]
    # the old run's tracker run held step 2 of the old records: sync sends it the rest of them only
    old = Sink("tracker-old")
    journal.mark_delivered("memory", "tracker-old", records[0].record_id)
    Delivery(journal, [old]).send_pending()
    assert [(r.step, r.scalars["x"], r.run) for r in old.records] == [(4, 1.0, "")]
    # a tracker run that holds nothing yet gets the newest run's records
    fresh = Sink("tracker-new")
    Delivery(journal, [fresh]).send_pending()
    assert [(r.step, r.scalars["x"]) for r in fresh.records] == [(2, 9.0)]


def test_accelerate_load_state_continues_the_folders_run_and_a_fresh_attach_is_a_new_run(tmp_path):
    from accelerate import Accelerator

    from uma_callbacks.triggers.accelerate import attach

    def handle_for():
        acc = Accelerator(cpu=True)
        acc.prepare(torch.nn.Linear(3, 1))  # the prepared model is what attach finds
        batches = [{"x": torch.randn(4, 3)}]
        handle = attach(acc, ["gradient_flow"], batches, trackers=[], output_dir=str(tmp_path / "uma"),
                        loss_fn=lambda m, b: m(b["x"]).sum(-1), draw_figures=False)
        return acc, handle

    acc, first = handle_for()
    first.step = 2
    acc.save_state(str(tmp_path / "ckpt-2"))
    first.remove()
    acc, resumed = handle_for()
    acc.load_state(str(tmp_path / "ckpt-2"))
    resumed.step = 4
    acc.save_state(str(tmp_path / "ckpt-4"))
    resumed.remove()
    acc, fresh = handle_for()
    fresh.step = 2
    acc.save_state(str(tmp_path / "other-2"))
    fresh.remove()
    runs = [(r.step, r.run) for r in Journal(tmp_path / "uma").records()]
    assert runs == [(2, first.session.run), (4, first.session.run), (2, fresh.session.run)]
    assert fresh.session.run != first.session.run


def test_a_backfill_into_the_training_run_leaves_its_run_param_alone(tmp_path, store, caplog):
    """A backfill joins the training's MLflow run: it logs no ``uma.run`` of its own (MLflow
    refused the change with a page of advice at every backfill)."""
    import logging

    from uma_callbacks import backfill

    out = tmp_path / "out"
    first = _callback()
    _train(out, first, max_steps=2, save_steps=2)
    with caplog.at_level(logging.WARNING):
        backfill(out, metrics=["gradient_flow"], trackers=["mlflow"])
    assert not [r for r in caplog.records if "uma.run" in r.getMessage()]
    (run,) = _runs(store)
    assert run.data.params["uma.run"] == first.session.run

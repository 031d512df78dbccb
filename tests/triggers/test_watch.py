"""``uma watch`` beside a training with ``measure="async"``: the in-process values, once each.

A tiny Qwen2 is trained from the same seed with the in-process callback (the reference
values) and announcing its checkpoints for a watcher (``watch.jsonl``, held copies,
``save_total_limit=1``). The watcher, a separate process following the run, must log the
reference's values (pair metrics and the optimizer state read from ``optimizer.pt``
included) at each checkpoint's step into the training's own tracker runs, once per
(key, step), whatever the Trainer's rotation deleted, across a ``kill -9``.

MLflow is the test worker's real ``mlflow server`` on 127.0.0.1 (the ``mlflow_server``
fixture), reached directly, through a :class:`~tests.reliability.servers.PortGate` that is
down for a while, or through a :class:`~tests.reliability.servers.FaultProxy` that stalls
every request; W&B runs offline.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from transformers import TrainerCallback

from tests.reliability.servers import FaultProxy, PortGate
from tests.trainer_cases import run_trainer, tiny_lm_dataset
from uma_callbacks.core.records import log_key
from uma_callbacks.engine.announce import HELD_DIR, WATCH_FILE, announce_finished, announce_run, read_announcements
from uma_callbacks.engine.journal import Journal, append_line, read_lines
from uma_callbacks.engine.probe import Probe
from uma_callbacks.integrations.base import tracker_key

pytestmark = pytest.mark.slow

METRICS = ["gradient_flow", "interpolation:n_points=5", "trajectory", "optimizer_state"]
NAMES = ["gradient_flow", "interpolation", "optimizer_state", "trajectory"]
STEPS = (3, 6, 9)
TRAIN = dict(max_steps=9, save_steps=3)
REPO = Path(__file__).resolve().parents[2]


def _probe() -> Probe:
    return Probe.from_dataset(tiny_lm_dataset(n=8, seed=3), 8, batch_size=8, seed=0)


def _async_callback(**kwargs):
    """The training side: UMACallback(measure="async") announces each checkpoint, measures nothing."""
    from uma_callbacks import UMACallback

    return UMACallback(metrics=METRICS, probe=_probe(), measure="async", seed=0, **kwargs)


class StartWatcher(TrainerCallback):
    """Starts ``uma watch`` at train begin, once the async callback (before it) has announced the run."""

    def __init__(self, cmd: list[str]) -> None:
        self.cmd, self.proc = cmd, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.proc = subprocess.Popen(self.cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _values(records) -> dict[tuple[int, str], dict[str, float]]:
    return {(r.step, r.metric): dict(r.scalars) for r in records if r.status in ("ok", "cached")}


def _assert_same(got, want, keys=None):
    for key in keys if keys is not None else want:
        assert set(got[key]) == set(want[key]), key
        for name, value in want[key].items():
            assert got[key][name] == pytest.approx(value, rel=1e-6, abs=1e-9), (key, name)


def _run_records(run_dir: Path, run: str):
    records = [r for r in Journal(run_dir / "uma").records() if r.run == run]
    pairs = [(r.step, r.metric) for r in records]
    assert len(pairs) == len(set(pairs)), f"a (step, metric) journalled twice: {sorted(pairs)}"
    return records


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "uma_callbacks.cli", "watch", *args]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_DIR", "MLFLOW_TRACKING_URI")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), WANDB_MODE="offline", WANDB_SILENT="true", **extra)
    return env


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The in-process callback's values (no compute budget) at steps 3, 6, 9."""
    from uma_callbacks import UMACallback

    run = tmp_path_factory.mktemp("inprocess")
    callback = UMACallback(metrics=METRICS, probe=_probe(), trackers=[], draw_figures=False, seed=0, overhead=None)
    run_trainer(run, callbacks=[callback], **TRAIN)
    values = _values(callback.records)
    assert {step for step, _ in values} == set(STEPS)
    assert (3, "interpolation") not in values and (6, "interpolation") in values and (9, "trajectory") in values
    assert all(len(values[(s, "optimizer_state")]) > 20 for s in STEPS)  # the live optimizer's state at each save
    return values


@pytest.fixture(scope="module")
def announced(tmp_path_factory):
    """A finished training that announced its checkpoints; save_total_limit=1 left checkpoint-9 only."""
    run = tmp_path_factory.mktemp("announced")
    callback = _async_callback(trackers=[])
    run_trainer(run, callbacks=[callback], save_total_limit=1, **TRAIN)
    assert not callback.records  # nothing measured in the training process
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-9"]
    held = run / "uma" / HELD_DIR
    assert sorted(p.name for p in held.iterdir()) == [f"checkpoint-{s}" for s in STEPS]
    # a metric reads the optimizer: its state is held with the weights
    assert all((held / f"checkpoint-{s}" / "optimizer.pt").is_file() for s in STEPS)
    return run, callback.session.run


def _copy(announced, tmp_path) -> tuple[Path, str]:
    template, run = announced
    dest = tmp_path / "run"
    shutil.copytree(template, dest)
    return dest, run


# ---------------------------------------------------------------------- beside a live training
def test_watch_beside_training_logs_the_callbacks_values_once_into_its_tracker_runs(
    tmp_path, reference, mlflow_server, monkeypatch
):
    """A watcher started at train begin (a subprocess) follows the training while it runs
    and logs with it into its MLflow run (through the real ``mlflow server``, at the URI the
    journal recorded) and its W&B run (offline: the watcher's own run file of the training's
    run id)."""
    from mlflow.tracking import MlflowClient

    from tests.integrations.wandb_runfile import history_rows, settled_records

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)  # the training's; the watcher's env has none
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"watch-beside-{uuid.uuid4().hex[:8]}")  # the worker's store is shared
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-train"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    import wandb

    wandb.teardown()  # settings an earlier test of this process left (another server, online) go
    run_dir = tmp_path / "run"
    callback = _async_callback()  # trackers: report_to's, joined and announced
    watcher = StartWatcher(_cli(str(run_dir), "--until-done", "--poll", "0.2", "--no-figures"))
    run_trainer(run_dir, callbacks=[callback, watcher], report_to=["mlflow", "wandb"], save_total_limit=1, **TRAIN)
    output = watcher.proc.communicate(timeout=240)[0]
    assert watcher.proc.returncode == 0, output

    records = _run_records(run_dir, callback.session.run)
    assert sorted({(r.step, r.metric) for r in records}) == [(s, m) for s in STEPS for m in NAMES]
    _assert_same(_values(records), reference)
    assert not list((run_dir / "uma" / HELD_DIR).iterdir()), "held copies released once all was measured"
    trackers = read_announcements(run_dir / "uma", run_dir).run.trackers
    assert trackers["mlflow"]["uri"] == mlflow_server.uri

    # MLflow: the training's run holds the watcher's keys, each once, at the checkpoints' steps,
    # with the in-process callback's values
    client = MlflowClient(tracking_uri=mlflow_server.store_uri)  # what reached the server, read from its store
    ml_run = client.get_run(trackers["mlflow"]["run"])
    assert "loss" in ml_run.data.metrics  # the training logged into it too
    assert len(client.search_runs([ml_run.info.experiment_id])) == 1  # no run of the watcher's own
    expected = _expected_points(records)
    _assert_mlflow_holds(client, ml_run.info.run_id, expected, reference)

    # W&B: the watcher's offline run file of the training's run id, each key once per step
    wb_run = trackers["wandb"]["run"]
    files = list((run_dir / "uma").glob(f"wandb/offline-run-*-{wb_run}/run-{wb_run}.wandb"))
    assert len(files) == 1, files
    wanted = {k for k in expected if not k.endswith(("/seconds", "/peak_mb"))}
    rows = history_rows(settled_records(run_dir / "uma", lambda rows: any(r.get("uma/step") == STEPS[-1] for r in rows)))
    seen: dict[tuple[str, int], float] = {}
    for row in rows:
        for key in wanted & set(row):
            assert (key, row["uma/step"]) not in seen, (key, row["uma/step"])
            seen[(key, row["uma/step"])] = row[key]
    assert set(seen) == {(k, s) for k in wanted for s in expected[k]}
    for (key, step), value in seen.items():
        assert value == pytest.approx(expected[key][step], rel=1e-6, abs=1e-9)
    for (step, metric), scalars in reference.items():
        for name, value in scalars.items():
            assert seen[(tracker_key(log_key(metric, name)), step)] == pytest.approx(value, rel=1e-6, abs=1e-9)


def _assert_mlflow_holds(client, run_id: str, expected: dict[str, dict[int, float]], reference=None) -> None:
    """The MLflow run holds each expected key once per step, at those steps; with ``reference``,
    every value of it there (the in-process callback's) to 1e-6."""
    assert len(expected) > 30
    logged: dict[str, dict[int, float]] = {}
    for key, by_step in expected.items():
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == sorted(by_step), key
        logged[key] = {m.step: m.value for m in history}
    for (step, metric), scalars in (reference or {}).items():
        for name, value in scalars.items():
            got = logged[tracker_key(log_key(metric, name))][step]
            assert got == pytest.approx(value, rel=1e-6, abs=1e-9), (step, metric, name)


def _expected_points(records) -> dict[str, dict[int, float]]:
    """``{tracker key: {step: value}}`` of the records (with each metric's seconds and peak_mb)."""
    expected: dict[str, dict[int, float]] = {}
    for r in records:
        for key, value in r.log_values().items():
            expected.setdefault(tracker_key(key), {})[r.step] = value
    return expected


# ---------------------------------------------------------------------- rotation, gone, stale
def test_rotation_loses_nothing_every_checkpoint_is_measured_from_its_held_copy(announced, reference, tmp_path):
    from uma_callbacks.triggers.watch import watch

    run_dir, run = _copy(announced, tmp_path)
    summary = watch(run_dir, until_done=True, poll=0.1, device="cpu", draw_figures=False)
    assert summary.ok, summary.describe()
    assert summary.measured == list(STEPS) and summary.finished
    records = _run_records(run_dir, run)
    _assert_same(_values(records), reference)
    assert {r.run for r in records} == {run} and {r.source for r in records} == {"watch"}
    optimizer = {r.step: r.meta["optimizer_source"] for r in records if r.metric == "optimizer_state"}
    assert optimizer == {s: f"checkpoint-{s}/optimizer.pt" for s in STEPS}  # each held copy's own optimizer.pt
    assert not list((run_dir / "uma" / HELD_DIR).iterdir())

    again = watch(run_dir, until_done=True, poll=0.1, device="cpu", draw_figures=False)  # a rerun measures nothing
    assert again.measured == [] and again.skipped == list(STEPS)


def test_a_checkpoint_gone_before_it_was_measured_is_an_error_record_naming_it(announced, tmp_path):
    from uma_callbacks.triggers.watch import CHECKPOINT_ERROR, watch

    run_dir, run = _copy(announced, tmp_path)
    shutil.rmtree(run_dir / "uma" / HELD_DIR / "checkpoint-6")  # rotated away and not held
    summary = watch(run_dir, until_done=True, poll=0.1, device="cpu", draw_figures=False)
    assert not summary.ok and summary.measured == [3, 9]
    errors = [r for r in _run_records(run_dir, run) if r.metric == CHECKPOINT_ERROR]
    assert [(r.step, r.status) for r in errors] == [(6, "error")]
    assert "checkpoint-6" in errors[0].error["message"] and "gone" in errors[0].error["message"]


def test_a_checkpoint_that_never_completes_is_an_error_record_once_not_a_hang(announced, tmp_path):
    from uma_callbacks.triggers.watch import CHECKPOINT_ERROR, watch

    run_dir, run = _copy(announced, tmp_path)
    _drop_finished(run_dir)
    crashed = run_dir / "checkpoint-12"
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"half written")
    os.utime(crashed, (time.time() - 60, time.time() - 60))
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(s=watch(run_dir, until_done=True, poll=0.1, stale_after=30, device="cpu", draw_figures=False))
    )
    thread.start()
    deadline = time.monotonic() + 120
    stale = []
    while not stale and time.monotonic() < deadline:  # reported while the training still runs
        stale = [r for r in Journal(run_dir / "uma").records() if r.metric == CHECKPOINT_ERROR]
        time.sleep(0.1)
    time.sleep(0.5)  # more polls: still once
    announce_finished(run_dir / "uma", 12)
    thread.join(timeout=120)
    assert not thread.is_alive()
    summary = result["s"]
    assert summary.measured == list(STEPS) and not summary.ok
    errors = [r for r in _run_records(run_dir, run) if r.metric == CHECKPOINT_ERROR]
    assert [(r.step, r.meta.get("path")) for r in errors] == [(12, str(crashed))]
    assert "never completed" in errors[0].error["message"]


def test_until_done_stops_when_the_training_died_without_its_finished_line(announced, tmp_path):
    """The training (here a process that has ended: its pid is free) never wrote its finished
    line: the watcher measures what it announced, reports its unannounced checkpoint folder,
    says the training died and stops, rather than waiting for ever."""
    from uma_callbacks.triggers.watch import CHECKPOINT_ERROR, watch

    run_dir, run = _copy(announced, tmp_path)
    _drop_finished(run_dir)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    watch_file = run_dir / "uma" / WATCH_FILE
    lines, bad = read_lines(watch_file)
    assert not bad
    watch_file.unlink()
    for line in lines:  # the run line names the ended process
        append_line(watch_file, dict(line, process=dict(line["process"], pid=pid)) if line["kind"] == "run" else line)
    (run_dir / "checkpoint-12").mkdir()  # its save never finished: fresh, younger than stale_after
    summary = watch(run_dir, ["gradient_flow"], until_done=True, poll=0.1, stale_after=3600, device="cpu", draw_figures=False)
    assert summary.measured == list(STEPS) and not summary.ok
    assert f"process {pid} on" in summary.died and "training died" in summary.describe()
    errors = [r for r in _run_records(run_dir, run) if r.metric == CHECKPOINT_ERROR]
    assert [r.step for r in errors] == [12] and "died" in errors[0].error["message"]
    assert not list((run_dir / "uma" / HELD_DIR).glob("*/*")), "held copies released"


def test_a_tracker_run_announced_after_the_watcher_started_gets_every_record(announced, mlflow_server, tmp_path):
    """The training's MLflow was down at its start; its run line names the run once it is up."""
    from uma_callbacks.triggers.watch import watch

    run_dir, run = _copy(announced, tmp_path)
    _drop_finished(run_dir)
    result = {}
    pairs = ["gradient_flow", "interpolation:n_points=5", "trajectory"]
    thread = threading.Thread(
        target=lambda: result.update(s=watch(run_dir, pairs, until_done=True, poll=0.1, draw_figures=False))
    )
    thread.start()
    _wait_for(lambda: len(_run_records(run_dir, run)) == len(STEPS) * len(pairs))
    client, ml_run = _mlflow_run(mlflow_server, "late")
    _name_tracker_run(run_dir, run, {"mlflow": {"run": ml_run, "uri": mlflow_server.uri}})
    thread.join(timeout=120)
    assert not thread.is_alive() and result["s"].ok, result["s"].describe()
    for key in ("uma/gradient_flow/total_norm", "uma/interpolation/distance", "uma/trajectory/update_norm"):
        steps = sorted(m.step for m in client.get_metric_history(ml_run, key))
        assert steps == (list(STEPS) if "gradient_flow" in key else list(STEPS[1:])), key


# ---------------------------------------------------------------------- a tracker down or stalled under watch
def test_a_tracker_down_while_the_watcher_logs_is_retried_as_the_live_sinks_are(
    announced, reference, mlflow_server, tmp_path, monkeypatch, caplog
):
    """The MLflow server is unreachable (its port refuses connections) until step 3 is
    measured: the watcher warns once, keeps going, and once the server is back delivers what
    it missed at the next checkpoint, each point once, with the in-process values."""
    import logging

    from uma_callbacks.triggers.watch import watch

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # refused at once: no MLflow backoff in this test
    gate = PortGate(mlflow_server.uri)  # down: nothing listens on its port yet
    run_dir, run = _copy(announced, tmp_path)
    client, ml_run = _mlflow_run(mlflow_server, "down")
    _name_tracker_run(run_dir, run, {"mlflow": {"run": ml_run, "uri": gate.uri}})
    delivered_at: dict[int, list[int]] = {}

    def progress(step, records):
        delivered_at[step] = sorted(m.step for m in client.get_metric_history(ml_run, "uma/gradient_flow/total_norm"))
        if step == STEPS[0]:
            gate.start()  # the server is back after the first checkpoint

    try:
        with caplog.at_level(logging.WARNING, logger="uma_callbacks"):
            summary = watch(run_dir, ["gradient_flow"], until_done=True, poll=0.1, device="cpu", draw_figures=False,
                            on_checkpoint=progress)  # fmt: skip
    finally:
        gate.stop()
    assert summary.ok and summary.measured == list(STEPS), summary.describe()
    assert delivered_at == {3: [], 6: [3, 6], 9: [3, 6, 9]}  # step 3 went with step 6, once the server was back
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "sink mlflow failed" in m]) == 1, messages  # once per outage
    assert any("sink mlflow is back" in m for m in messages)
    flow = {key: scalars for key, scalars in reference.items() if key[1] == "gradient_flow"}
    _assert_mlflow_holds(client, ml_run, _expected_points(_run_records(run_dir, run)), flow)


def test_a_stalling_tracker_does_not_hang_the_watcher_and_uma_sync_delivers_later(announced, mlflow_server, tmp_path):
    """Every request to MLflow is held unanswered (a server that accepts but never replies):
    each tracker call is abandoned after ``tracker_timeout_seconds``, the watcher measures
    every checkpoint and returns, naming the sink; ``uma sync`` delivers it all later, once."""
    from uma_callbacks.cli import main
    from uma_callbacks.triggers.watch import watch

    proxy = FaultProxy(mlflow_server.uri, stall_max=60)
    run_dir, run = _copy(announced, tmp_path)
    client, ml_run = _mlflow_run(mlflow_server, "stall")
    _name_tracker_run(run_dir, run, {"mlflow": {"run": ml_run, "uri": proxy.uri}})
    try:
        proxy.set("stall")
        started = time.monotonic()
        summary = watch(run_dir, ["gradient_flow"], until_done=True, poll=0.1, device="cpu", draw_figures=False,
                        tracker_timeout_seconds=1)  # fmt: skip
        seconds = time.monotonic() - started
        assert seconds < 30, seconds  # one abandoned call, not MLflow's minutes of retries per record
        assert summary.measured == list(STEPS) and summary.sink_failures == ["mlflow"], summary.describe()
        assert "sink mlflow failed: its records stay in the journal (`uma sync` replays them)" in summary.describe()
        assert proxy.hits >= 1 and client.get_metric_history(ml_run, "uma/gradient_flow/total_norm") == []
        proxy.release()
        assert main(["sync", str(run_dir), "--mlflow-run", ml_run, "--tracking-uri", proxy.uri]) == 0
    finally:
        proxy.stop()
    _assert_mlflow_holds(client, ml_run, _expected_points(_run_records(run_dir, run)))


def _mlflow_run(server, label: str):
    """``(client, run id)``: a new run in an experiment of its own, made through the shared
    server; the client reads the server's store (what reached it), one history in milliseconds."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=server.uri)
    experiment = client.create_experiment(f"watch-{label}-{uuid.uuid4().hex[:8]}")
    return MlflowClient(tracking_uri=server.store_uri), client.create_run(experiment).info.run_id


def _name_tracker_run(run_dir: Path, run: str, trackers: dict) -> None:
    """The training's run line again, naming ``trackers`` (as a training whose tracker came up late writes it); finished."""
    first = read_announcements(run_dir / "uma", run_dir).run
    announce_run(run_dir / "uma", run, trackers, first.metrics)
    announce_finished(run_dir / "uma", STEPS[-1])


# ---------------------------------------------------------------------- the optimizer state
def test_optimizer_state_falls_back_to_the_folder_while_it_holds_that_step_else_says_why(announced, reference, tmp_path):
    """Held copies without ``optimizer.pt`` (a training whose own metrics did not read the
    optimizer): checkpoint-9's folder is still there and still step 9, so it is read from
    there; steps 3 and 6 were rotated away, and their skip records say why."""
    from uma_callbacks.triggers.watch import watch

    run_dir, run = _copy(announced, tmp_path)
    for step in STEPS:
        (run_dir / "uma" / HELD_DIR / f"checkpoint-{step}" / "optimizer.pt").unlink()
    summary = watch(run_dir, ["optimizer_state"], until_done=True, poll=0.1, device="cpu", draw_figures=False)
    records = {r.step: r for r in _run_records(run_dir, run)}
    assert sorted(records) == list(STEPS), summary.describe()
    assert records[9].status == "ok" and records[9].meta["optimizer_source"] == "checkpoint-9/optimizer.pt"
    _assert_same({(9, "optimizer_state"): records[9].scalars}, reference, keys=[(9, "optimizer_state")])
    for step in (3, 6):
        assert records[step].status == "skipped", records[step]
        reason = records[step].error["message"]
        assert f"the held copy of checkpoint-{step} (step {step}) has no optimizer.pt" in reason, reason
        assert "the checkpoint folder is gone" in reason, reason
        assert "add optimizer_state to the training's metrics" in reason, reason


def test_stale_after_on_the_command_line_turns_a_never_completed_folder_into_an_error(announced, tmp_path, capsys):
    from uma_callbacks.cli import main
    from uma_callbacks.triggers.watch import CHECKPOINT_ERROR

    run_dir, run = _copy(announced, tmp_path)
    (run_dir / "checkpoint-12").mkdir()  # the training finished without announcing it complete
    args = ["watch", str(run_dir), "--until-done", "--poll", "0.1", "--no-figures", "--device", "cpu"]
    assert main([*args, "--metrics", "gradient_flow", "--stale-after", "600"]) == 1
    out = capsys.readouterr().out
    assert "3 checkpoint(s) measured" in out and "1 error(s)" in out, out
    assert f"error at step 12 ({run_dir / 'checkpoint-12'}): checkpoint folder" in out and "never completed" in out, out
    errors = [r for r in _run_records(run_dir, run) if r.metric == CHECKPOINT_ERROR]
    assert [(r.step, r.status, r.meta["path"]) for r in errors] == [(12, "error", str(run_dir / "checkpoint-12"))]
    assert main([*args, "--metrics", "gradient_flow", "--stale-after", "0"]) == 2  # refused, naming the option
    assert "stale_after must be a positive number of seconds" in capsys.readouterr().err


def test_watch_without_an_announced_run_says_so_and_exits_2(tmp_path, capsys):
    from uma_callbacks.cli import main

    (tmp_path / "checkpoint-3").mkdir()
    assert main(["watch", str(tmp_path), "--until-done"]) == 2
    assert 'measure="async"' in capsys.readouterr().err
    (tmp_path / "uma").mkdir()
    (tmp_path / "uma" / WATCH_FILE).write_text('{"kind": "finished", "step": 3, "time": 0}\n')
    assert main(["watch", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "announces no run" in err and 'measure="async"' in err
    assert main(["watch", str(tmp_path / "missing")]) == 2
    assert main(["watch", str(tmp_path), "--poll", "0"]) == 2
    assert "poll must be a positive number of seconds" in capsys.readouterr().err


# ---------------------------------------------------------------------- kill -9 and restart
def test_watcher_killed_mid_measure_resumes_without_duplicates_or_loss(announced, reference, tmp_path):
    """SIGKILL while step 6's slow metric runs; the restart measures the rest of step 6
    (its pair metrics compare with step 3, refilled from the held copy; its optimizer state
    from the held optimizer.pt) and step 9."""
    run_dir, run = _copy(announced, tmp_path)
    metrics = ["--metrics", "gradient_flow", "--metric", "landscape:n_points=15", "--metric", "interpolation:n_points=5",
               "--metric", "trajectory", "--metric", "optimizer_state"]  # fmt: skip
    cmd = _cli(str(run_dir), "--until-done", "--poll", "0.1", "--no-figures", "--seed", "0", "--device", "cpu", *metrics)
    first = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    journal = run_dir / "uma" / "journal.jsonl"
    deadline = time.monotonic() + 180
    cut = None
    while cut is None and time.monotonic() < deadline and first.poll() is None:
        done = {(r["step"], r["metric"]) for r in _lines(journal) if r.get("run") == run}
        if (6, "gradient_flow") in done:
            cut = done
            first.send_signal(signal.SIGKILL)
        time.sleep(0.02)
    out = first.communicate(timeout=60)[0].decode()
    assert cut is not None, out
    assert first.returncode == -signal.SIGKILL
    assert (6, "landscape") not in cut and (9, "gradient_flow") not in cut, "killed mid-measure of step 6"

    second = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "watch: step 3:" not in second.stdout and "watch: step 6: landscape ok" in second.stdout, second.stdout
    assert "2 checkpoint(s) measured, 1 already measured" in second.stdout  # 3 skipped; 6 completed; 9
    records = _run_records(run_dir, run)
    assert sorted({(r.step, r.metric) for r in records}) == sorted(
        (s, m) for s in STEPS for m in ["gradient_flow", "interpolation", "landscape", "optimizer_state", "trajectory"]
    )
    _assert_same(_values(records), reference, keys=list(reference))


def _drop_finished(run_dir: Path) -> None:
    """The training is still running: no finished line yet."""
    watch_file = run_dir / "uma" / WATCH_FILE
    lines = watch_file.read_text().splitlines()
    watch_file.write_text("\n".join(line for line in lines if '"finished"' not in line) + "\n")


def _wait_for(condition, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def _lines(path: Path) -> list[dict]:
    out = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line)["record"])
        except (ValueError, KeyError, TypeError):
            pass
    return out


def test_the_watchers_wandb_sink_joins_the_run_as_a_shared_mode_second_writer(monkeypatch, tmp_path):
    """Online: W&B's shared mode, not a resume (the training stays the primary writer and
    alone ends the run); a wandb service inherited from the training is not used."""
    import wandb

    from uma_callbacks.integrations.registry import make_sink
    from uma_callbacks.triggers.watch import WRITER_LABEL

    calls = []

    def fake_init(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("no server in this test")

    monkeypatch.setattr(wandb, "init", fake_init)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_SERVICE", "inherited-from-the-training")
    sink = make_sink("wandb", run_id="abc123", project="p", writer_label=WRITER_LABEL, fallback_dir=tmp_path)
    with pytest.raises(RuntimeError):
        sink.start()
    (kwargs,) = calls
    settings = kwargs["settings"]
    assert kwargs["id"] == "abc123" and "resume" not in kwargs
    assert (settings.mode, settings.x_primary, settings.x_label, settings.x_update_finish_state) == (
        "shared", False, WRITER_LABEL, False,
    )
    assert "WANDB_SERVICE" not in os.environ

    monkeypatch.setenv("WANDB_MODE", "offline")  # no shared mode offline: a run file of its own, same run id
    calls.clear()
    with pytest.raises(RuntimeError):
        make_sink("wandb", run_id="abc123", writer_label=WRITER_LABEL, fallback_dir=tmp_path).start()
    assert calls[0]["id"] == "abc123" and calls[0]["resume"] == "allow" and "settings" not in calls[0]

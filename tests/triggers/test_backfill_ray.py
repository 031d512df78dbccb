"""Backfill fanned out on a local Ray (2 CPUs, 127.0.0.1): same records as one process, each once, a killed worker's task retried."""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.mlflow_store import mlflow_store
from tests.test_checkpoints import fake_trainer_run
from tests.trainer_cases import tiny_lm_dataset
from uma_callbacks.engine.journal import Journal
from uma_callbacks.engine.probe import Probe, save_probe
from uma_callbacks.metrics import DirectionalSharpness, FisherInformation, OptimizerState
from uma_callbacks.metrics.gradient_flow import GradientFlow
from uma_callbacks.triggers.backfill import backfill

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")
pytest.importorskip("mlflow")

from uma_callbacks.triggers.ray_backfill import plan_tasks, ray_backfill  # noqa: E402

STEPS = (1, 2, 3, 4, 5, 6, 7, 8)
#: gradient_flow (cheap), interpolation (a pair metric), landscape 5x5 (expensive: its own task), trajectory (added)
METRICS = ["gradient_flow", "interpolation:n_points=5", "landscape:n_points=5"]
TASK = "ray::uma_backfill_task"


class SlowGradientFlow(GradientFlow):
    """gradient_flow that takes a second: a task long enough to kill its worker in."""

    def _compute(self, ctx):
        time.sleep(1.0)
        return super()._compute(ctx)


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for the module (starting one takes seconds): 2 CPUs, no dashboard."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # SlowGradientFlow travels by value
    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="WARNING")
    print(f"ray start: {time.perf_counter() - started:.2f} s")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def run8(tmp_path_factory):
    """8 tiny Qwen2 checkpoints, a saved probe, and the one-process backfill's records (the reference)."""
    root = tmp_path_factory.mktemp("ray")
    run = fake_trainer_run(root / "run", steps=STEPS)
    save_probe(Probe.from_dataset(tiny_lm_dataset(n=4, seed=3), 4), run / "uma")
    started = time.perf_counter()
    ref = backfill(run, metrics=METRICS, output_dir=root / "ref", draw_figures=False, progress=False)
    print(f"in-process backfill: {time.perf_counter() - started:.2f} s")
    assert ref.ok, ref.describe()
    return {"run": run, "root": root, "ref": {(r.step, r.metric): r for r in ref.records}}


def _same(record, ref):
    assert record.status == ref.status, (record.metric, record.step, record.error)
    assert record.cache_key == ref.cache_key and record.checkpoint == ref.checkpoint and record.probe == ref.probe
    assert record.meta.get("config") == ref.meta.get("config")
    assert set(record.scalars) == set(ref.scalars), record.metric
    for key, value in ref.scalars.items():
        if math.isnan(value):
            assert math.isnan(record.scalars[key]), key
        else:
            assert record.scalars[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (record.metric, record.step, key)


def _check_journal(folder, ref, metrics):
    records = [r for r in Journal(folder).records() if r.metric in metrics]
    keys = [(r.step, r.metric) for r in records]
    assert len(keys) == len(set(keys)), "a (step, metric) journalled twice"
    assert set(keys) == {k for k in ref if k[1] in metrics}
    for record in records:
        _same(record, ref[(record.step, record.metric)])
        assert not record.missing_files, record.missing_files
        assert (record.status != "ok") or record.files
        for rel in record.files:  # the result files are in the run's journal, where the record says
            assert (Path(folder) / rel).is_file(), rel
    return records


def _kill_first_task(found):
    """SIGKILL the first worker process seen running a backfill task (titled ``ray::uma_backfill_task``).

    Only this process's descendants are looked at (Ray's raylet and its workers are): a few
    processes a poll, never another Ray on the machine.
    """
    deadline = time.time() + 120
    me = psutil.Process()
    while time.time() < deadline and not found.get("done"):
        for proc in me.children(recursive=True):
            try:
                cmdline = " ".join(proc.cmdline())
            except psutil.Error:  # ended meanwhile
                continue
            if cmdline.startswith(TASK):
                time.sleep(0.2)  # inside the task
                os.kill(proc.pid, signal.SIGKILL)
                found["killed"] = proc.pid
                return
        time.sleep(0.05)


def test_a_worker_killed_mid_task_is_retried_and_its_result_counted_once(ray_local, run8, tmp_path):
    """The module's first Ray tasks: the worker killed is one of the two Ray started with, still
    loading its first checkpoint, and the worker that takes the retry serves the later tests
    (a killed worker is always replaced by a new process, which imports torch and transformers)."""
    steps = (1, 2, 3)
    checkpoints = [run8["run"] / f"checkpoint-{s}" for s in steps]
    found: dict = {}
    killer = threading.Thread(target=_kill_first_task, args=(found,))
    killer.start()
    try:
        summary = ray_backfill(checkpoints, metrics=[SlowGradientFlow()], output_dir=tmp_path / "uma",
                               draw_figures=False, progress=False)
    finally:
        found["done"] = True
        killer.join()
    assert "killed" in found, "no task process was seen"
    assert not psutil.pid_exists(found["killed"]) or psutil.Process(found["killed"]).status() == psutil.STATUS_ZOMBIE
    assert summary.ok and summary.failed_tasks == 0, summary.describe()
    assert len(summary.task_seconds) == summary.tasks == len(steps)  # each task's result once
    # the killed process was running its first task: no result came from it, that task's came from a retry
    assert found["killed"] not in summary.workers
    ref = {k: v for k, v in run8["ref"].items() if k[0] in steps}
    records = _check_journal(tmp_path / "uma", ref, {"gradient_flow", "trajectory"})
    assert len(records) == 2 * len(steps)


def test_ray_backfill_of_8_checkpoints_equals_the_one_process_backfill_once_per_step(ray_local, run8, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = mlflow_store(tmp_path)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("ray")).info.run_id
    started = time.perf_counter()
    summary = ray_backfill(run8["run"], metrics=METRICS, output_dir=tmp_path / "uma", mlflow_run_id=run_id,
                           tracking_uri=uri, draw_figures=False, progress=False)
    seconds = time.perf_counter() - started
    per_task = sum(summary.task_seconds) / len(summary.task_seconds)
    overhead = (sum(summary.task_seconds) - summary.load_seconds - summary.compute_seconds) / summary.tasks
    print(f"ray backfill: {seconds:.2f} s, {summary.tasks} tasks, {per_task:.3f} s per task in the worker "
          f"({overhead:.3f} s of it neither loading nor measuring)")
    assert summary.ok, summary.describe()
    # one task per checkpoint for the cheap metrics, one per checkpoint for the 5x5 landscape
    assert summary.split == ["landscape"] and summary.tasks == 2 * len(STEPS) and summary.failed_tasks == 0
    assert len(set(summary.workers)) >= 2  # both CPUs worked
    ref = run8["ref"]
    assert {(r.step, r.metric) for r in summary.records} == set(ref)
    for record in summary.records:
        _same(record, ref[(record.step, record.metric)])
    assert ref[(2, "interpolation")].status == "ok" and ref[(8, "trajectory")].status == "ok"
    _check_journal(tmp_path / "uma", ref, {"gradient_flow", "interpolation", "landscape", "trajectory"})
    # the MLflow run holds each key once per step, at the checkpoint's step
    keys = [k for k in client.get_run(run_id).data.metrics if k.startswith("uma/")]
    for key in keys:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert len(steps) == len(set(steps)), key
        assert set(steps) <= set(STEPS), key
    metric = {k.split("/")[1] for k in keys}
    assert {"gradient_flow", "interpolation", "landscape", "trajectory"} <= metric
    grad_key = next(k for k in keys if k.startswith("uma/gradient_flow/"))
    assert sorted(m.step for m in client.get_metric_history(run_id, grad_key)) == list(STEPS)
    # a rerun computes nothing: every result is a cache hit through the workers, nothing logged twice
    again = ray_backfill(run8["run"], metrics=METRICS, output_dir=tmp_path / "uma", mlflow_run_id=run_id,
                         tracking_uri=uri, draw_figures=False, progress=False)
    assert again.computed == 0 and again.cached == summary.computed, again.describe()
    assert sorted(m.step for m in client.get_metric_history(run_id, grad_key)) == list(STEPS)


def test_cli_routes_to_ray_with_task_options(ray_local, run8, tmp_path, capsys):
    from uma_callbacks.cli import main

    code = main(["backfill", str(run8["run"]), "--executor", "ray", "--cpus-per-task", "1", "--gpus-per-task", "0",
                 "--metrics", "gradient_flow", "--no-trajectory", "--output-dir", str(tmp_path / "uma"), "--no-figures"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "ray: 8 task(s)" in out
    records = [r for r in Journal(tmp_path / "uma").records() if r.metric == "gradient_flow"]
    assert sorted(r.step for r in records) == list(STEPS)
    for record in records:
        _same(record, run8["ref"][(record.step, "gradient_flow")])


@pytest.mark.parametrize("argv, needle", [
    (["--executor", "dask"], "--executor: invalid choice: 'dask' (choose from 'local', 'ray')"),
    (["--executor", "ray", "--cpus-per-task", "-1"], "--cpus-per-task: must be a number >= 0"),
    (["--executor", "ray", "--gpus-per-task", "x"], "--gpus-per-task: must be a number >= 0"),
    (["--ray-address", "127.0.0.1:6379"], "--ray-address need --executor ray"),
])
def test_bad_executor_options_exit_2_naming_the_option(argv, needle, tmp_path, capsys):
    from uma_callbacks.cli import main

    try:
        code = main(["backfill", str(tmp_path), *argv])
    except SystemExit as exit_:  # argparse
        code = exit_.code
    assert code == 2
    assert needle in capsys.readouterr().err


def test_without_ray_the_command_names_the_extra_and_exits_2(tmp_path, capsys, monkeypatch):
    """Ray absent (``import ray`` raises ImportError): the command and the Ray backfill's module
    are imported again with Ray blocked, as a fresh process would import them, then run."""
    import importlib

    import uma_callbacks

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    for name in ("uma_callbacks.cli", "uma_callbacks.triggers.ray_backfill"):
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delattr(uma_callbacks, "cli", raising=False)
    monkeypatch.delattr(uma_callbacks.triggers, "ray_backfill", raising=False)
    cli = importlib.import_module("uma_callbacks.cli")  # no Ray needed to import the command
    run = fake_trainer_run(tmp_path / "run", steps=(1,))
    assert cli.main(["backfill", str(run), "--executor", "ray"]) == 2
    assert 'pip install "uma-callbacks[ray]"' in capsys.readouterr().err


def test_the_plan_gives_expensive_metrics_their_own_task_unless_a_compute_budget_is_shared():
    from uma_callbacks.config import UMAConfig

    cfg = UMAConfig(metrics=["gradient_flow", "fisher", "hessian", "landscape:n_points=5", "trajectory"])
    tasks = plan_tasks(2, cfg, n_batches=1)
    assert [t.metrics for t in tasks[:3]] == [("gradient_flow", "fisher", "trajectory"), ("hessian",), ("landscape",)]
    assert len(tasks) == 6
    shared = UMAConfig(metrics=cfg.metrics, seconds_per_save=10.0)
    assert [t.metrics for t in plan_tasks(2, shared, 1)] == [tuple(cfg.metric_names)] * 2


# ---------------------------------------------------------------------- a metric reading another's results
HANDOFF_STEPS = (1, 2)


def _handoff_metrics():
    return [OptimizerState(), DirectionalSharpness(directions=["gradient", "fisher"]), FisherInformation(top_k=2)]


def _with_optimizer_files(run):
    """Give each checkpoint an ``optimizer.pt``: two AdamW steps of its model (parameter order), saved as the Trainer saves it."""
    from transformers import AutoModelForCausalLM

    batch = {"input_ids": torch.randint(1, 50, (2, 6), generator=torch.Generator().manual_seed(0))}
    for step in HANDOFF_STEPS:
        folder = run / f"checkpoint-{step}"
        model = AutoModelForCausalLM.from_pretrained(folder)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(2):
            opt.zero_grad()
            model(**batch, labels=batch["input_ids"]).loss.backward()
            opt.step()
        torch.save(opt.state_dict(), folder / "optimizer.pt")
    return run


def test_ray_backfill_reads_optimizer_pt_and_hands_fisher_on_as_in_one_process(ray_local, tmp_path):
    run = _with_optimizer_files(fake_trainer_run(tmp_path / "run", steps=HANDOFF_STEPS))
    save_probe(Probe.from_dataset(tiny_lm_dataset(n=4, seed=3), 4), run / "uma")
    common = {"trajectory": False, "draw_figures": False, "progress": False, "use_cache": False}
    ref = backfill(run, metrics=_handoff_metrics(), output_dir=tmp_path / "ref", **common)
    # sharpness alone would be an expensive task here: it stays in fisher's task, whose results it reads
    summary = ray_backfill(run, metrics=_handoff_metrics(), output_dir=tmp_path / "uma", expensive_backwards=2.0, **common)
    assert summary.ok and summary.failed_tasks == 0, summary.describe()
    assert summary.tasks == len(HANDOFF_STEPS) and summary.split == []
    expected = {(r.step, r.metric): r for r in ref.records}
    assert {(r.step, r.metric) for r in summary.records} == set(expected)
    for record in summary.records:
        want = expected[(record.step, record.metric)]
        assert record.status == want.status and record.status in ("ok", "partial"), (record.metric, record.error)
        assert "results_missing" not in record.meta
        assert set(record.scalars) == set(want.scalars), record.metric
        for key, value in want.scalars.items():
            assert record.scalars[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (record.step, record.metric, key)
        if record.metric == "optimizer_state":
            assert record.meta["optimizer_source"] == f"checkpoint-{record.step}/optimizer.pt"
            assert record.scalars["step"] == 2.0 and "fisher_spearman" in record.scalars
        if record.metric == "sharpness":
            assert "fisher/curvature" in record.scalars


def test_the_plan_keeps_a_metric_with_the_metrics_whose_results_it_reads():
    from uma_callbacks.config import UMAConfig

    cfg = UMAConfig(metrics=["gradient_flow", "landscape:n_points=5", *_handoff_metrics()])
    names = cfg.metric_names
    assert [t.metrics for t in plan_tasks(1, cfg, n_batches=1, threshold=2.0)] == [
        ("gradient_flow", "optimizer_state", "sharpness", "fisher"), ("landscape",),
    ]  # fmt: skip
    # everything expensive: the consumers join fisher's task, the others keep their own
    assert [t.metrics for t in plan_tasks(1, cfg, n_batches=1, threshold=0.0)] == [
        ("gradient_flow",), ("landscape",), ("optimizer_state", "sharpness", "fisher"),
    ]  # fmt: skip
    assert names == ["gradient_flow", "landscape", "optimizer_state", "sharpness", "fisher"]

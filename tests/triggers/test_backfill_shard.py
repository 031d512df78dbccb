"""``uma backfill --shard K/N``: job-array shards of a backfill, then one ``uma sync``.

Real parts: tiny Qwen2 checkpoint folders as the Trainer writes them, two shards at once
(one a process of its own, ``python -m uma_callbacks.cli``, the other in the test's process,
which has imported everything already), a SQLite MLflow store read back with MlflowClient.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.mlflow_store import mlflow_store
from tests.test_checkpoints import fake_trainer_run
from tests.trainer_cases import tiny_lm_dataset
from uma_callbacks.checkpoints import discover_checkpoints
from uma_callbacks.cli import main
from uma_callbacks.config import UMAConfig
from uma_callbacks.engine.journal import Journal
from uma_callbacks.engine.probe import Probe, save_probe
from uma_callbacks.integrations.base import tracker_key
from uma_callbacks.metrics import GradientFlow
from uma_callbacks.session import Session
from uma_callbacks.triggers.backfill import backfill, parse_shard, shard_block
from uma_callbacks.triggers.history_seed import seed_history
from uma_callbacks.triggers.prefetch import ModelLoader

pytestmark = pytest.mark.slow
mlflow = pytest.importorskip("mlflow")
REPO = Path(__file__).resolve().parents[2]
STEPS = (2, 4, 6, 8, 10)
#: gradient_flow, a cheap interpolation (history 1) and the trajectory the backfill adds (history 2 + the first)
METRICS = ["--metrics", "gradient_flow", "--metric", "interpolation:n_points=3", "--no-figures"]


def _run_folder(root: Path, steps=STEPS) -> Path:
    run = fake_trainer_run(root / "run", steps=steps)
    save_probe(Probe.from_dataset(tiny_lm_dataset(n=6, seed=2), 6), run / "uma")
    return run


def _start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "uma_callbacks.cli", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return out


def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    """Until ``path`` exists (the process got that far), or the process has ended."""
    deadline = time.time() + 120
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)


def _measured(journal: Journal) -> dict[tuple[str, int], dict[str, float]]:
    """``{(metric, step): scalars}`` of the measured records; each (metric, step) journalled once."""
    records = [r for r in journal.records() if r.metric and r.status in ("ok", "partial")]
    counts = Counter((r.metric, r.step) for r in records)
    assert all(n == 1 for n in counts.values()), {k: n for k, n in counts.items() if n > 1}
    return {(r.metric, r.step): r.scalars for r in records}


def test_two_shards_at_once_then_sync_equal_one_backfill(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    run = _run_folder(tmp_path)
    assert main(["backfill", str(run), *METRICS, "--output-dir", str(tmp_path / "ref")]) == 0
    capsys.readouterr()
    reference = _measured(Journal(tmp_path / "ref"))
    assert {m for m, _ in reference} == {"gradient_flow", "interpolation", "trajectory"}
    assert sorted(s for m, s in reference if m == "trajectory") == [4, 6, 8, 10]

    uri = mlflow_store(tmp_path)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("shards")).info.run_id
    trackers = ["--mlflow-run", run_id, "--tracking-uri", uri]
    # shard 0 in a process of its own, shard 1 here while shard 0 measures (a job array of two)
    proc = _start("backfill", str(run), *METRICS, *trackers, "--shard", "0/2")
    _wait_for(run / "uma" / "claims", proc)  # shard 0 claimed its first result
    assert main(["backfill", str(run), *METRICS, *trackers, "--shard", "1/2"]) == 0
    second = capsys.readouterr().out
    first = _finish(proc)
    assert "shard 0/2: 3 of 5 checkpoint(s), steps 2..6" in first
    # block 1 starts at step 8: trajectory needs the first checkpoint and the two before, interpolation one
    assert "shard 1/2: 2 of 5 checkpoint(s), steps 8..10; history seeded with step(s) [2, 4, 6]" in second
    assert f"uma sync {run} --trackers mlflow --mlflow-run {run_id}" in second
    assert not client.get_run(run_id).data.metrics  # the shards deliver nothing themselves

    sharded = _measured(Journal(run / "uma"))
    assert set(sharded) == set(reference)
    for key, scalars in reference.items():
        assert set(sharded[key]) == set(scalars), key
        for name, value in scalars.items():
            assert sharded[key][name] == pytest.approx(value, rel=1e-6, abs=1e-9), (key, name)

    assert main(["sync", str(run), *trackers]) == 0
    logged = client.get_run(run_id).data.metrics
    records = [r for r in Journal(run / "uma").records() if r.metric and r.status in ("ok", "partial")]
    for record in records:
        for key in record.log_values():
            assert tracker_key(key) in logged, key
    for key in logged:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert len(steps) == len(set(steps)), (key, steps)  # each key once per step
    for (metric, step), scalars in reference.items():
        for name in ("total_norm", "distance", "distance_from_first"):
            if name in scalars:
                history = dict((m.step, m.value) for m in client.get_metric_history(run_id, f"uma/{metric}/{name}"))
                assert history[step] == pytest.approx(scalars[name], rel=1e-6, abs=1e-9), (metric, name, step)
    assert main(["sync", str(run), *trackers]) == 0  # a second sync adds nothing
    assert all(len(client.get_metric_history(run_id, key)) == len(STEPS) for key in logged if "gradient_flow" in key)


class SlowGradientFlow(GradientFlow):
    """gradient_flow that sleeps first: the other backfill asks for the same key meanwhile."""

    def _compute(self, ctx):
        time.sleep(0.5)
        return super()._compute(ctx)


#: The other backfill: the same metric (its class's name and settings give the same cache keys)
_SLOW_SHARD = """
import sys, time
from pathlib import Path
from uma_callbacks.metrics import GradientFlow
from uma_callbacks.triggers.backfill import backfill

class SlowGradientFlow(GradientFlow):
    def _compute(self, ctx):
        time.sleep(0.5)  # long enough that the other process asks for this key meanwhile
        return super()._compute(ctx)

go = Path(sys.argv[2])
Path(sys.argv[3]).write_text("ready")
while not go.exists():
    time.sleep(0.02)
s = backfill(sys.argv[1], metrics=[SlowGradientFlow()], trajectory=False, draw_figures=False, progress=False,
             shard=(0, 2))
print("RESULT", s.computed, s.cached, s.ok)
"""


def test_overlapping_shards_at_once_compute_each_key_once_for_the_training_run(tmp_path):
    run = _run_folder(tmp_path, steps=(2, 4, 6, 8))
    training = "ab" * 16  # the run the checkpoints' markers name: their records belong to it
    for step in (2, 4, 6, 8):
        (run / f"checkpoint-{step}" / "uma_run.json").write_text(json.dumps({"format": "uma-run/1", "run": training, "step": step}))
    script = tmp_path / "slow_shard.py"
    script.write_text(textwrap.dedent(_SLOW_SHARD))
    go, ready = tmp_path / "go", tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(run), str(go), str(ready)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    _wait_for(ready, proc)
    go.write_text("go")  # the other process and this one start their shard 0/2 (steps 2 and 4) at the same moment
    here = backfill(run, metrics=[SlowGradientFlow()], trajectory=False, draw_figures=False, progress=False, shard=(0, 2))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    line = next(x for x in out.splitlines() if x.startswith("RESULT"))
    results = [line.split()[1:], [str(here.computed), str(here.cached), str(here.ok)]]
    assert sum(int(computed) for computed, _, _ in results) == 2, results  # steps 2 and 4, once each
    assert sum(int(cached) for _, cached, _ in results) == 2, results  # the other process's results
    assert all(ok == "True" for _, _, ok in results)
    journal = Journal(run / "uma")
    assert set(_measured(journal)) == {("gradient_flow", 2), ("gradient_flow", 4)}
    assert {r.run for r in journal.records() if r.metric} == {training}


def test_bad_shard_values_exit_2_naming_the_option(tmp_path, capsys):
    run = _run_folder(tmp_path, steps=(2, 4))
    for bad in ("2/2", "-1/2", "1", "a/b", "1/0", "0/2/3", ""):
        assert main(["backfill", str(run), f"--shard={bad}", "--no-figures"]) == 2, bad
        err = capsys.readouterr().err
        assert "--shard must be K/N with integers 0 <= K < N" in err, (bad, err)
    assert not (run / "uma" / "journal.jsonl").exists()
    with pytest.raises(ValueError, match=r"shard must be \(K, N\)"):
        backfill(run, shard=(3, 2), progress=False)
    assert parse_shard(" 3/4 ") == (3, 4)


def test_more_shards_than_checkpoints_leave_an_empty_shard_that_exits_0(tmp_path, capsys):
    run = _run_folder(tmp_path, steps=(2, 4))
    assert [shard_block(2, (k, 3)) for k in range(3)] == [(0, 1), (1, 2), (2, 2)]
    assert main(["backfill", str(run), "--shard", "2/3", "--no-figures"]) == 0
    out = capsys.readouterr().out
    assert "shard 2/3: no checkpoint to measure (2 checkpoint(s) for 3 shards); nothing to do" in out
    assert not (run / "uma" / "journal.jsonl").exists()


def test_seed_history_pushes_the_first_and_the_usable_predecessors_only(tmp_path):
    run = fake_trainer_run(tmp_path / "run", steps=(1, 2, 3, 4, 5, 6))
    (run / "checkpoint-4" / "model.safetensors").write_bytes(b"not safetensors")
    checkpoints = discover_checkpoints(run)
    session = Session(UMAConfig(metrics=["gradient_flow", "trajectory"]), tmp_path / "uma", source="backfill")
    pushed = seed_history(session, ModelLoader(None, __import__("torch").device("cpu")), checkpoints, 5)
    # trajectory: the first checkpoint and the two usable ones before step 6 (step 4 is damaged)
    assert pushed == [1, 3, 5]
    assert session.history.first is not None and session.history.first.step == 1
    assert [s.step for s in session.history.previous] == [3, 5]
    assert all(s.fingerprint for s in session.history.previous)  # as measure() would key them
    with pytest.raises(ValueError, match="upto must be in 0..6"):
        seed_history(session, lambda c: None, checkpoints, 7)

"""A Trainer run's figures are drawn off the training path, and reach the trackers however the run ends.

Real tiny ``Trainer`` runs (6 steps, a save every 2), real MLflow (SQLite store, read back
with ``MlflowClient``) and W&B offline (read back from the ``.wandb`` run file): the
figures of every save arrive when training ends, when it stops early, and when it stops
by an exception after a save (filed then at interpreter exit, or at ``session.close()``).
"""

from __future__ import annotations

import threading

import pytest
from transformers import TrainerCallback

import uma_callbacks.engine.late_figures as late_figures
from tests.integrations.wandb_runfile import artifacts, history_rows, settled_records
from tests.mlflow_store import mlflow_store
from tests.trainer_cases import run_trainer, tiny_lm_dataset
from uma_callbacks import UMACallback
from uma_callbacks.engine.journal import Journal

pytestmark = pytest.mark.slow
METRICS = ["gradient_flow", "fisher"]
FIGURES = {"gradient_flow": ["gradient_flow-layers.png"], "fisher": ["fisher-spectrum.png", "fisher-layers.png"]}


class Stop(TrainerCallback):
    """After the callback's save at ``step``: stop the training (``early``), or raise."""

    def __init__(self, step: int, early: bool) -> None:
        self.step, self.early = step, early

    def on_save(self, args, state, control, **kwargs):
        if state.global_step != self.step:
            return
        if not self.early:
            raise RuntimeError("the training broke after a save")
        control.should_training_stop = True


@pytest.fixture
def trackers(tmp_path, monkeypatch):
    """MLflow on a SQLite store and W&B offline, both under ``tmp_path``; the MLflow URI."""
    pytest.importorskip("mlflow")
    wandb = pytest.importorskip("wandb")
    uri = mlflow_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_PROJECT", "uma-test")
    (tmp_path / "wb").mkdir()
    wandb.teardown()  # wandb caches settings (WANDB_DIR) per process: start clean
    yield uri
    if wandb.run is not None:
        wandb.finish()
    wandb.teardown()


@pytest.fixture
def drawn_in(monkeypatch):
    """The names of the threads the figures were drawn in."""
    names: set[str] = set()
    render = late_figures.render

    def watched(result):
        names.add(threading.current_thread().name)
        return render(result)

    monkeypatch.setattr(late_figures, "render", watched)
    return names


def _mlflow_files(uri: str, cb: UMACallback, step: int) -> set[str]:
    from mlflow.tracking import MlflowClient

    run_id = next(s for s in cb.sinks if s.name == "mlflow").run_id()
    return {f.path.rsplit("/", 1)[-1] for f in MlflowClient(uri).list_artifacts(run_id, f"uma/step-{step}")}


def _mlflow_steps(uri: str, cb: UMACallback, key: str) -> set[int]:
    from mlflow.tracking import MlflowClient

    run_id = next(s for s in cb.sinks if s.name == "mlflow").run_id()
    return {m.step for m in MlflowClient(uri).get_metric_history(run_id, key)}


def _expected(steps) -> dict[int, set[str]]:
    return {s: {f"{m}.json" for m in METRICS} | {f for m in METRICS for f in FIGURES[m]} for s in steps}


def test_a_training_that_raises_after_a_save_files_its_figures_at_exit(tmp_path, trackers, drawn_in):
    cb = UMACallback(metrics=METRICS, probe=tiny_lm_dataset(n=8), probe_size=8, trackers=["mlflow", "wandb"])
    with pytest.raises(RuntimeError, match="broke after a save"):
        run_trainer(tmp_path / "out", callbacks=[cb, Stop(4, early=False)], max_steps=6, save_steps=2)
    # step 4's figures were still queued when it broke (step 2's too, if the worker was slower than the steps)
    assert cb.session.figures.pending >= len(METRICS)
    assert not {f for f in _mlflow_files(trackers, cb, 4) if f.endswith(".png")}  # its values went out, not its files
    assert 4 in _mlflow_steps(trackers, cb, "uma/gradient_flow/total_norm")
    late_figures.close_all()  # what the interpreter runs at exit (UMACallback's session.close())
    assert cb.session.figures.pending == 0 and drawn_in and all(n.startswith("uma-figures") for n in drawn_in)
    for step, names in _expected([2, 4]).items():
        assert _mlflow_files(trackers, cb, step) >= names, step
        records = [r for r in Journal(tmp_path / "out" / "uma").records() if r.step == step]
        assert {n for r in records for n in (f.rsplit("/", 1)[-1] for f in r.files)} >= names
    # W&B: every figure as an image on its step's row, and in the step's artifact
    rows = history_rows(settled_records(tmp_path / "wb", lambda rows: len(rows) >= 1))
    records = settled_records(tmp_path / "wb", lambda rows: True)
    for step in (2, 4):
        keys = {k for r in rows if r.get("uma/step") == step for k in r}
        assert {"uma/gradient_flow/figures/layers/_type", "uma/fisher/figures/spectrum/_type"} <= keys, (step, keys)
    contents = {a.name: {e.path for e in a.manifest.contents} for a in artifacts(records)}
    for step, names in _expected([2, 4]).items():
        for metric in METRICS:
            [name] = [n for n in contents if n.endswith(f"-{metric}-step-{step}")]
            assert {f"step-{step}/{f}" for f in FIGURES[metric]} <= contents[name], contents[name]
    images = list((tmp_path / "wb").rglob("media/images/**/*.png"))
    assert len(images) >= 2 * sum(len(f) for f in FIGURES.values()), images


def test_a_training_stopped_early_files_its_figures_at_its_end(tmp_path, trackers):
    cb = UMACallback(metrics=METRICS, probe=tiny_lm_dataset(n=8), probe_size=8, trackers=["mlflow"])
    trainer, _ = run_trainer(tmp_path / "out", callbacks=[cb, Stop(2, early=True)], max_steps=6, save_steps=2)
    assert trainer.state.global_step == 2 and cb.session.figures.pending == 0
    assert _mlflow_files(trackers, cb, 2) >= _expected([2])[2]

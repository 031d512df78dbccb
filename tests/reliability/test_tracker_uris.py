"""Issue 29 item 4a: tracker URIs built from paths reach the store where the path says.

An ``output_dir`` containing ``%41`` made the fallback ``sqlite:///.../mlflow.db`` URL
unopenable (SQLAlchemy decoded ``%41`` to ``A``: MLflow retried each call for about 100 s);
with ``?`` the store was created outside the run folder (SQLAlchemy cut the path at the
query). The URI is now escaped (integrations/uris.py), MLflow's stray folder from the
escaped text is removed, and a new experiment in a local store keeps its artifacts beside
the store, not in the current directory's ``mlruns``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from uma_callbacks.integrations.uris import no_stray_folders, sqlite_path, sqlite_uri

HOSTILE = ["pct%41", "pct%2541", "q?x=1", "hash#1", "sp ace", "ünï🙂", "new\nline", "amp&x;y@z:w", "pct%"]


@pytest.mark.parametrize("name", HOSTILE)
def test_sqlite_uri_is_read_back_as_the_same_path_by_sqlalchemy(name, tmp_path):
    from sqlalchemy.engine import make_url

    path = tmp_path / name / "mlflow.db"
    uri = sqlite_uri(path)
    url = make_url(uri)
    assert url.database == str(path.resolve()) and not url.query
    assert sqlite_path(uri) == path.resolve()


def test_sqlite_uri_escapes_only_what_sqlalchemy_misreads(tmp_path):
    """A needless escape would make MLflow create a folder from the escaped text."""
    path = tmp_path / "sp ace#ünï" / "mlflow.db"
    assert sqlite_uri(path) == f"sqlite:///{path.resolve()}"


def test_a_path_that_is_not_utf8_is_refused_with_a_message(tmp_path):
    bad = tmp_path / os.fsdecode(b"bad\xff") / "mlflow.db"
    with pytest.raises(ValueError, match="not valid UTF-8.*tracking_uri"):
        sqlite_uri(bad)


def test_no_stray_folders_keeps_what_it_did_not_create(tmp_path):
    uri = sqlite_uri(tmp_path / "a%41" / "uma" / "mlflow.db")
    stray = Path(uri[len("sqlite:///") :]).parent
    with no_stray_folders(uri):
        stray.mkdir(parents=True)  # what MLflow does
    assert not stray.exists() and not stray.parent.exists()
    with no_stray_folders(uri):
        stray.mkdir(parents=True)
        (stray / "user file").write_text("x")  # not empty: not removed
    assert (stray / "user file").exists()


def _outside(base: Path, run: Path) -> list[str]:
    """Everything under ``base`` that is not inside ``run``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path != run and run not in path.parents:
                found.append(str(path.relative_to(base)))
    return found


@pytest.mark.slow
def test_trainer_run_in_a_hostile_output_dir_keeps_its_store_inside_and_readable(tmp_path, monkeypatch):
    """A real Trainer run with the fallback store, in a folder named ``a%41 b?c=1#d ünï🙂``."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from tests.trainer_cases import run_trainer
    from uma_callbacks import UMACallback
    from uma_callbacks.engine.journal import Journal
    from uma_callbacks.triggers.run_sinks import delivered_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    base = tmp_path / "base"
    base.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # MLflow's default artifact root is ./mlruns: it must not be used
    run = base / "a%41 b?c=1#d ünï🙂"
    cb = UMACallback(metrics=["gradient_flow"], probe_size=8, trackers=["mlflow"], draw_figures=False)
    trainer, _ = run_trainer(run, callbacks=[cb], max_steps=2, save_steps=2)
    assert trainer.state.global_step == 2
    assert not cb.session.delivery.failing  # the store opened: an unopenable one stalled ~100 s, then failed
    assert (run / "uma" / "mlflow.db").is_file()
    assert _outside(base, run) == []  # no store, no stray folder beside the run folder
    assert list(cwd.iterdir()) == []  # no ./mlruns
    journal = Journal(run / "uma")
    delivered = delivered_run(journal, "mlflow")
    assert delivered is not None and sqlite_path(delivered["uri"]) == (run / "uma" / "mlflow.db").resolve()
    client = MlflowClient(delivered["uri"])  # the URI the journal records opens the same store
    (record,) = [r for r in journal.records() if r.metric == "gradient_flow"]
    history = client.get_metric_history(delivered["run"], "uma/gradient_flow/total_norm")
    assert [(m.step, m.value) for m in history] == [(2, record.scalars["total_norm"])]
    artifacts = client.list_artifacts(delivered["run"], "uma/step-2")
    assert artifacts, "the record's files were uploaded"
    artifact_root = Path(client.get_run(delivered["run"]).info.artifact_uri.removeprefix("file://"))
    from urllib.parse import unquote

    assert run.resolve() in Path(unquote(str(artifact_root))).parents

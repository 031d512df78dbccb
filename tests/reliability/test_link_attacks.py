"""Issue 29, section 2: links planted in ``uma/`` neither redirect a write nor leak a file.

- A ``uma/step-<N>`` that is a symbolic link to a folder outside: the save at step N
  writes nothing through it, the record is kept and names the refused files, training
  goes on (before: the files landed outside and the save crashed, the record was lost).
- The same for a variant subfolder, a target file name and a temporary file name that
  are links.
- A hard link inside ``uma/`` to a file outside: ``uma sync`` uploads only files whose
  content is what the journal wrote (``file_ids``), and never a file with several links
  (records of older versions, without ``file_ids``, too).
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from tests.mlflow_store import mlflow_store
from tests.trainer_cases import run_trainer
from uma_callbacks import UMACallback
from uma_callbacks.cli import main
from uma_callbacks.core.records import Record, artifact_path
from uma_callbacks.engine.journal import Journal
from uma_callbacks.metrics.base import MetricResult

SECRET = b"the contents of a file outside the run"


def _result() -> MetricResult:
    return MetricResult(name="m", scalars={"x": 1.0}, arrays={"a": np.arange(4.0)})


def _outside(tmp_path):
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.txt").write_bytes(SECRET)
    return folder


def _untouched(folder) -> bool:
    return sorted(p.name for p in folder.iterdir()) == ["secret.txt"] and (folder / "secret.txt").read_bytes() == SECRET


@pytest.mark.slow
def test_a_symlinked_step_folder_is_refused_and_training_keeps_its_records(tmp_path, caplog):
    outside = _outside(tmp_path)
    root = tmp_path / "run" / "uma"
    root.mkdir(parents=True)
    os.symlink(outside, root / "step-2")
    cb = UMACallback(metrics=["gradient_flow"], probe_size=4, trackers=[], draw_figures=True)
    with caplog.at_level(logging.WARNING, logger="uma_callbacks"):
        trainer, losses = run_trainer(tmp_path / "run", callbacks=[cb], max_steps=4, save_steps=2)
    assert trainer.state.global_step == 4 and len(losses) == 4
    assert _untouched(outside)  # nothing was written through the link
    records = {r.step: r for r in Journal(root).records()}
    assert [(s, r.status) for s, r in sorted(records.items())] == [(2, "ok"), (4, "ok")]
    two, four = records[2], records[4]
    assert two.files == [] and "step-2/gradient_flow.json" in two.missing_files
    assert all(why.startswith("refused: ") for why in two.missing_files.values())
    assert "step-2/gradient_flow-layers.png" in two.missing_files  # the figure too
    assert "not written" in caplog.text and "step-2" in caplog.text
    assert four.missing_files == {} and "step-4/gradient_flow.json" in four.files
    assert all(artifact_path(root, rel, four.file_ids[rel]) is not None for rel in four.files)


@pytest.mark.parametrize("where", ["subfolder", "target", "temporary"])
def test_links_inside_a_step_folder_are_never_written_through(tmp_path, where):
    outside = _outside(tmp_path)
    journal = Journal(tmp_path / "run" / "uma")
    step = journal.root / "step-3"
    step.mkdir()
    if where == "subfolder":
        os.symlink(outside, step / "variant")
    elif where == "target":
        os.symlink(outside / "secret.txt", step / "m.npz")
    else:  # the fixed temporary names of earlier versions
        for name in ("m.json.tmp", "m.npz.tmp.npz"):
            os.symlink(outside / "secret.txt", step / name)
    record = Record(step=3, metric="m", status="ok")
    journal.write_result(record, _result(), subfolder="variant" if where == "subfolder" else "")
    journal.append(record)
    assert _untouched(outside)
    back = Journal(journal.root).records()[0]
    if where == "subfolder":
        assert back.files == [] and set(back.missing_files) == {"step-3/variant/m.json", "step-3/variant/m.npz"}
        assert journal.refused_writes == sorted(back.missing_files)
    elif where == "target":
        assert back.files == ["step-3/m.json"] and list(back.missing_files) == ["step-3/m.npz"]
        assert "symbolic link" in back.missing_files["step-3/m.npz"]
        assert (step / "m.npz").is_symlink()  # left as it was, reported
    else:
        assert back.files == ["step-3/m.json", "step-3/m.npz"] and back.missing_files == {}
        assert json.loads((step / "m.json").read_text())["scalars"] == {"x": 1.0}


def _journal_with_a_hard_link(tmp_path, with_ids: bool):
    """A record of three files; ``m.npz`` is then replaced by a hard link to a file outside."""
    outside = _outside(tmp_path)
    journal = Journal(tmp_path / "run" / "uma")
    record = Record(step=1, metric="m", status="ok", scalars={"x": 1.0}, cache_key="k1")
    result = _result()
    result.arrays["b"] = np.ones(3)
    journal.write_result(record, result)
    assert record.files == ["step-1/m.json", "step-1/m.npz"] and set(record.file_ids) == set(record.files)
    if not with_ids:  # as an older version wrote it
        record.file_ids = {}
    journal.append(record)
    npz = journal.root / "step-1" / "m.npz"
    npz.unlink()
    os.link(outside / "secret.txt", npz)
    return journal, outside


def _mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = mlflow_store(tmp_path)
    client = MlflowClient(uri)
    return uri, client, client.create_run(client.create_experiment("links")).info.run_id


@pytest.mark.parametrize("with_ids", [True, False], ids=["file_ids", "older_record"])
def test_uma_sync_never_uploads_a_hard_link_to_a_file_outside(tmp_path, with_ids, caplog):
    pytest.importorskip("mlflow")
    _journal_with_a_hard_link(tmp_path, with_ids)
    uri, client, run_id = _mlflow(tmp_path)
    with caplog.at_level(logging.WARNING, logger="uma_callbacks"):
        assert main(["sync", str(tmp_path / "run"), "--mlflow-run", run_id, "--tracking-uri", uri]) == 0
    uploaded = [a.path for a in client.list_artifacts(run_id, "uma/step-1")]
    assert uploaded == ["uma/step-1/m.json"]
    assert "'step-1/m.npz'" in caplog.text and "refused" in caplog.text
    assert [m.value for m in client.get_metric_history(run_id, "uma/m/x")] == [1.0]  # the values still go


def test_a_file_changed_after_it_was_written_or_not_written_by_the_journal_is_not_uploaded(tmp_path):
    journal = Journal(tmp_path / "uma")
    record = Record(step=1, metric="m", status="ok")
    journal.write_result(record, _result())
    json_path, npz_path = (journal.root / rel for rel in record.files)
    ids = record.file_ids
    assert artifact_path(journal.root, "step-1/m.json", ids["step-1/m.json"]) == json_path.resolve()
    with open(npz_path, "r+b") as fh:  # same inode, same size, other bytes
        fh.write(b"PK\x03\x05")
    assert artifact_path(journal.root, "step-1/npz", ids["step-1/m.npz"]) is None
    assert artifact_path(journal.root, "step-1/m.npz", ids["step-1/m.npz"]) is None
    assert artifact_path(journal.root, "step-1/m.npz") is not None  # an older record's check: one link, inside
    assert artifact_path(journal.root, "step-1/m.json", {"size": "big", "sha256": 3}) is None  # a forged identity
    from uma_callbacks.integrations.base import uploadable_files

    (journal.root / "step-1" / "planted.png").write_bytes(b"\x89PNG")
    record.files.append("step-1/planted.png")  # listed, but not written by the journal
    assert [p.name for p in uploadable_files(journal.root, record)] == ["m.json"]

"""Issue 29, section 4: a full disk leaves no empty file, and the result files come back.

Before: training went on and the journal caught up, but the figures were left as 0-byte
PNGs, and the JSON and npz files of the saves made while the disk was full were never
written. Now a file that fails is removed and kept in memory; it is written at the next
:meth:`Journal.flush` once space returns, while its record still waits; a record that
reached the disk before its files did names them in ``missing_files``.

A real full filesystem (the 1 MiB tmpfs of ``test_disk_full``; needs root, skipped
otherwise). Nothing is monkeypatched.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from tests.reliability import test_disk_full
from tests.reliability.test_disk_full import Fill
from tests.trainer_cases import run_trainer
from uma_callbacks import UMACallback
from uma_callbacks.core.records import Record, artifact_path
from uma_callbacks.engine.journal import Journal
from uma_callbacks.metrics.base import MetricResult

disk = test_disk_full.disk  # the tmpfs fixture
PNG = b"\x89PNG\r\n\x1a\n" + b"\x01" * 30_000


def _result() -> MetricResult:
    return MetricResult(name="m", scalars={"a": 1.0}, arrays={"x": np.arange(40_000.0)})  # a 320 kB npz


def _record(step: int) -> Record:
    """A record whose journal line (about 50 kB) does not fit in the slack of the journal's last page."""
    return Record(step=step, metric="m", status="ok", scalars={f"k{i}": float(i) for i in range(3000)}, cache_key=f"k{step}")


def _files(root) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def _no_empty_or_partial(root) -> None:
    files = _files(root)
    assert not [f for f, size in files.items() if size == 0], files
    assert not [f for f in files if f.endswith(".tmp") or ".tmp." in f], files


def _all_there(journal: Journal, record: Record) -> None:
    assert record.missing_files == {}
    for rel in record.files:
        assert artifact_path(journal.root, rel, record.file_ids[rel]) is not None, rel


def test_files_that_failed_on_a_full_disk_are_written_once_space_returns(disk):
    journal = Journal(disk.folder / "uma")
    journal.append(Record(step=1, metric="m", status="ok", cache_key="k1"))
    disk.fill()
    record = _record(2)
    journal.write_result(record, _result(), figures={"m-figure.png": PNG})
    journal.append(record)
    assert set(record.missing_files) == {"step-2/m.json", "step-2/m.npz", "step-2/m-figure.png"}
    assert all("No space left" in why for why in record.missing_files.values())
    _no_empty_or_partial(journal.root)
    assert [f for f in _files(journal.root) if f.startswith("step-2")] == []
    assert journal.flush() is False  # still full: the record and its files wait
    disk.free()
    assert journal.flush() is True
    back = {r.step: r for r in Journal(journal.root).records()}[2]
    assert back.files == ["step-2/m.json", "step-2/m.npz", "step-2/m-figure.png"]
    _all_there(journal, back)
    assert (journal.root / "step-2" / "m-figure.png").read_bytes() == PNG
    with np.load(journal.root / "step-2" / "m.npz", allow_pickle=False) as data:
        assert np.array_equal(data["x"], np.arange(40_000.0))
    _no_empty_or_partial(journal.root)


def test_a_record_written_before_its_files_names_the_missing_ones(disk):
    journal = Journal(disk.folder / "uma")
    journal.append(Record(step=1, metric="m", status="ok", cache_key="k1"))
    disk.fill()
    with open(disk.filler, "r+b") as fh:  # room for a journal line and the small files, not for the figure
        fh.truncate(os.path.getsize(disk.filler) - 64 * 1024)
    record = Record(step=2, metric="m", status="ok", scalars={"a": 1.0}, cache_key="k2")
    small = MetricResult(name="m", scalars={"a": 1.0}, arrays={"x": np.arange(10.0)})
    journal.write_result(record, small, figures={"m-figure.png": PNG * 4})
    journal.append(record)
    assert journal.pending == []  # the line made it
    back = {r.step: r for r in Journal(journal.root).records()}[2]
    assert back.files == ["step-2/m.json", "step-2/m.npz"] and list(back.missing_files) == ["step-2/m-figure.png"]
    assert "No space left" in back.missing_files["step-2/m-figure.png"]
    _no_empty_or_partial(journal.root)
    disk.free()
    assert journal.flush() is True
    assert not (journal.root / "step-2" / "m-figure.png").exists()  # the record on disk says it is missing


def test_a_figure_saved_to_a_full_disk_leaves_no_empty_png(disk):
    plots = pytest.importorskip("uma_callbacks.plots")
    result = MetricResult(name="gradient_flow", scalars={"layers/a/norm": 1.0, "layers/b/norm": 2.0, "total_norm": 3.0})
    folder = disk.folder / "figures"
    folder.mkdir()
    disk.fill()
    with pytest.raises(OSError):
        plots.draw_result(result, folder)
    assert list(folder.iterdir()) == []
    disk.free()
    [path] = plots.draw_result(result, folder)
    assert path.read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_trainer_on_a_full_disk_gets_every_file_of_every_save_once_space_returns(disk, tmp_path):
    pytest.importorskip("matplotlib")
    root = disk.folder / "uma"
    cb = UMACallback(metrics=["gradient_flow"], probe_size=4, trackers=[], draw_figures=True, output_dir=str(root))
    callbacks = [Fill(disk, "free", free_at=6), cb, Fill(disk, "begin")]
    trainer, losses = run_trainer(tmp_path / "run", callbacks=callbacks, max_steps=6, save_steps=2)
    assert trainer.state.global_step == 6 and len(losses) == 6
    journal = Journal(root)
    records = journal.records()
    assert [(r.step, r.status) for r in records] == [(2, "ok"), (4, "ok"), (6, "ok")]
    for record in records:
        step = f"step-{record.step}"
        assert f"{step}/gradient_flow.json" in record.files and f"{step}/gradient_flow-layers.png" in record.files
        _all_there(journal, record)
    _no_empty_or_partial(root)

"""Issue 17 item 3: a full disk never reaches the caller; records wait in memory and are written later.

A real full filesystem: a 1 MiB tmpfs mounted for the test (needs root; skipped
otherwise) and filled up with a filler file. Nothing is monkeypatched.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from transformers import TrainerCallback

from tests.tmpfs import mounted_tmpfs
from tests.trainer_cases import run_trainer
from uma_callbacks import UMACallback
from uma_callbacks.core.records import Record
from uma_callbacks.engine.journal import Journal
from uma_callbacks.metrics.base import MetricResult


class Disk:
    """A mounted tmpfs that :meth:`fill` fills up and :meth:`free` empties again."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.filler = folder / "filler.bin"

    def fill(self) -> None:
        with open(self.filler, "ab", buffering=0) as fh:
            chunk = b"\0" * 4096
            try:
                while True:
                    fh.write(chunk)
            except OSError:
                pass  # full: that is the point
        with open(self.filler, "ab", buffering=0) as fh:  # the last partial page, byte by byte
            try:
                while True:
                    fh.write(b"\0" * 64)
            except OSError:
                pass

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)


@pytest.fixture
def disk(tmp_path):
    with mounted_tmpfs(tmp_path / "disk", "size=1m") as folder:
        yield Disk(folder)


def _big(step: int) -> Record:
    return Record(step=step, metric="m", status="ok", scalars={f"k{i}": float(i) for i in range(3000)}, cache_key=f"key{step}")


def test_journal_on_a_full_disk_keeps_records_pending_and_writes_them_later(disk, caplog):
    journal = Journal(disk.folder / "uma")
    journal.append(Record(step=1, metric="m", status="ok", cache_key="key1"))
    disk.fill()
    before = journal.path.read_bytes()
    with caplog.at_level(logging.WARNING, logger="uma_callbacks"):
        journal.append(_big(2))  # does not fit: no exception
        journal.append(_big(3))
        files = journal.write_files(MetricResult(name="m", scalars={"a": 1.0}, arrays={"x": np.ones(50_000)}), 2)
        journal.mark_delivered("mlflow", "run", "id2")
    assert journal.path.read_bytes() == before  # nothing half-written is left
    assert not list((disk.folder / "uma").rglob("*.tmp*"))
    assert files in ([], ["step-2/m.json"])
    assert [r.step for r in journal.records()] == [1, 2, 3] and journal.lookup("key3").step == 3
    assert journal.delivered("mlflow", "run") == {"id2"}
    warnings = [r for r in caplog.records if "cannot write" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]  # once per outage
    assert journal.flush() is False
    assert [r.step for r in Journal(journal.root).records()] == [1]  # another reader sees whole lines only
    disk.free()
    assert journal.flush() is True and journal.pending == []
    again = Journal(journal.root)
    assert [r.step for r in again.records()] == [1, 2, 3] and again.bad_lines == 0
    assert again.delivered("mlflow", "run") == {"id2"}


class Fill(TrainerCallback):
    """After the UMA callback's on_train_begin: fill the disk; free it at ``free_at`` before UMA measures."""

    def __init__(self, disk: Disk, when: str, free_at: int | None = None) -> None:
        self.disk, self.when, self.free_at = disk, when, free_at

    def on_train_begin(self, args, state, control, **kwargs):
        if self.when == "begin":
            self.disk.fill()

    def on_save(self, args, state, control, **kwargs):
        if self.when == "free" and state.global_step == self.free_at:
            self.disk.free()


@pytest.mark.slow
def test_trainer_keeps_training_on_a_full_disk_and_the_journal_catches_up(disk, tmp_path):
    cb = UMACallback(
        metrics=["gradient_flow"], probe_size=4, trackers=[], draw_figures=False, output_dir=str(disk.folder / "uma")
    )
    callbacks = [Fill(disk, "free", free_at=6), cb, Fill(disk, "begin")]
    trainer, losses = run_trainer(tmp_path / "run", callbacks=callbacks, max_steps=6, save_steps=2)
    assert trainer.state.global_step == 6 and len(losses) == 6
    journal = Journal(disk.folder / "uma")
    assert [(r.step, r.status) for r in journal.records()] == [(2, "ok"), (4, "ok"), (6, "ok")]
    assert journal.bad_lines == 0

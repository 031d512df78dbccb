"""Figures drawn off the training path: the worker queue, the journal's figure notes, values now and files later.

No assertion reads a clock: the worker is held on an event where a test needs it busy.
"""

from __future__ import annotations

import json
import logging
import threading

import numpy as np
import pytest

from uma_callbacks.core.records import Record
from uma_callbacks.engine.delivery import Delivery
from uma_callbacks.engine.figure_notes import FIGURES_FILE
from uma_callbacks.engine.journal import Journal
from uma_callbacks.engine.late_figures import LateFigures, read_result
from uma_callbacks.integrations.base import MemorySink
from uma_callbacks.metrics.base import MetricResult

PNG = b"\x89PNG\r\n\x1a\n" + b"0" * 32


def _journalled(journal: Journal, step: int = 2, metric: str = "m", subfolder: str = "") -> Record:
    """A record written as the suite writes one at a save: result files first, then its line."""
    result = MetricResult(name=metric, scalars={"x": 1.5}, arrays={"a": np.arange(3.0)}, meta={"config": {"k": 1}})
    record = Record(step=step, metric=metric, status="ok", scalars={"x": 1.5}, cache_key=f"key-{metric}-{step}")
    journal.write_result(record, result, subfolder)
    journal.append(record)
    return record


def test_the_worker_draws_from_the_journalled_files_in_its_own_thread_and_collect_keeps_the_order(tmp_path):
    journal = Journal(tmp_path)
    first, second = _journalled(journal, 2, "m"), _journalled(journal, 4, "m", subfolder="m-1234abcd")
    seen: list[tuple[str, str, list[float]]] = []
    release = threading.Event()

    def renderer(result: MetricResult) -> dict[str, bytes]:
        seen.append((threading.current_thread().name, result.name, result.arrays["a"].tolist()))
        release.wait(timeout=60)
        return {f"{result.name}-figure.png": PNG}

    figures = LateFigures(renderer)
    figures.submit(first, tmp_path)
    figures.submit(second, tmp_path)
    assert figures.awaits(first) and figures.pending == 2
    assert figures.collect() == []  # the worker is still drawing: nothing waits for it
    release.set()
    drawn = figures.collect(wait=True)
    assert [(d.record, d.subfolder, d.figures) for d in drawn] == [
        (first, "", {"m-figure.png": PNG}), (second, "m-1234abcd", {"m-figure.png": PNG})
    ]  # fmt: skip
    assert all(name.startswith("uma-figures") for name, _, _ in seen) and seen[0][2] == [0.0, 1.0, 2.0]
    assert figures.pending == 0 and not figures.awaits(first)
    figures.shutdown()


def test_a_drawer_that_raises_gives_no_figures_and_one_warning(tmp_path, caplog):
    journal = Journal(tmp_path)
    record = _journalled(journal)

    def broken(result: MetricResult) -> dict[str, bytes]:
        raise ValueError("no such colormap")

    figures = LateFigures(broken)
    figures.submit(record, tmp_path)
    with caplog.at_level(logging.WARNING, logger="uma_callbacks"):
        [drawn] = figures.collect(wait=True)
    assert drawn.figures == {} and "could not draw m at step 2 (ValueError: no such colormap)" in caplog.text
    figures.shutdown()


def test_a_result_file_held_back_by_a_full_disk_is_drawn_once_written(tmp_path):
    journal = Journal(tmp_path)
    record = Record(step=2, metric="m", status="ok", scalars={"x": 1.0}, cache_key="k",
                    missing_files={"step-2/m.json": "OSError: No space left on device"})  # fmt: skip
    figures = LateFigures(lambda result: {"m-figure.png": PNG})
    figures.submit(record, tmp_path)
    assert figures.collect() == [] and figures.pending == 1  # not started: its file is not there yet
    journal.write_result(record, MetricResult(name="m", scalars={"x": 1.0}))  # the journal's retry
    [drawn] = figures.collect(wait=True)
    assert drawn.figures == {"m-figure.png": PNG}
    figures.shutdown()


def test_read_result_takes_the_files_as_written_else_the_records_own_values(tmp_path):
    journal = Journal(tmp_path)
    record = _journalled(journal)
    back = read_result(tmp_path, record)
    assert back.scalars == {"x": 1.5} and back.arrays["a"].tolist() == [0.0, 1.0, 2.0]
    (tmp_path / "step-2" / "m.json").write_text(json.dumps({"name": "m", "scalars": {"x": 99.0}}))
    assert read_result(tmp_path, record).scalars == {"x": 1.5}  # a changed file is not read
    refused = Record(step=3, metric="m", status="ok", scalars={"x": 2.0}, missing_files={"step-3/m.json": "refused: link"})
    assert read_result(tmp_path, refused).scalars == {"x": 2.0}


def test_figures_written_after_the_record_read_back_with_it(tmp_path):
    journal = Journal(tmp_path)
    record = _journalled(journal, subfolder="m-1234abcd")
    journal.add_figures(record, {"m-figure.png": PNG}, "m-1234abcd")
    rel = "step-2/m-1234abcd/m-figure.png"
    assert rel in record.files and (tmp_path / rel).read_bytes() == PNG
    for reader in (journal, Journal(tmp_path)):  # this process, and another one reading the folder
        [back] = reader.records()
        assert back.files == ["step-2/m-1234abcd/m.json", "step-2/m-1234abcd/m.npz", rel]
        assert back.file_ids[rel]["size"] == len(PNG) and back.missing_files == {}
    [line] = (tmp_path / "journal.jsonl").read_text().splitlines()  # the record's own line is never rewritten
    assert rel not in line


def test_figure_notes_are_data_from_disk_only_a_records_own_pngs_are_taken(tmp_path):
    journal = Journal(tmp_path)
    record = _journalled(journal)
    journal.add_figures(record, {"m-figure.png": PNG})
    good = json.loads((tmp_path / FIGURES_FILE).read_text().splitlines()[0])["record"]
    ident = good["file_ids"]["step-2/m-figure.png"]
    from uma_callbacks.engine.journal import append_line

    for hostile in (
        {**good, "files": ["../../etc/passwd"], "file_ids": {"../../etc/passwd": ident}},
        {**good, "files": ["step-3/m-figure.png"], "file_ids": {"step-3/m-figure.png": ident}},  # another step's
        {**good, "files": ["step-2/m.sh"], "file_ids": {"step-2/m.sh": ident}},
        {**good, "file_ids": {"step-2/m-figure.png": {"size": -1, "sha256": "x"}}},
        {**good, "id": "not an id"},
        ["a", "list"],
    ):
        append_line(tmp_path / FIGURES_FILE, hostile)
    with open(tmp_path / FIGURES_FILE, "a") as fh:
        fh.write('{"sha": "0", "record": {"torn\n')
    [back] = Journal(tmp_path).records()
    assert back.files == ["step-2/m.json", "step-2/m.npz", "step-2/m-figure.png"]
    assert back.file_ids["step-2/m-figure.png"] == ident


def test_a_figure_on_a_full_disk_is_noted_missing_then_written_at_a_later_flush(tmp_path, monkeypatch):
    import uma_callbacks.engine.journal as journal_module

    journal = Journal(tmp_path)
    record = _journalled(journal)
    put = journal_module.put_file

    def full(fd, name, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(journal_module, "put_file", full)
    journal.add_figures(record, {"m-figure.png": PNG})
    [back] = Journal(tmp_path).records()
    assert "step-2/m-figure.png" in back.missing_files and "step-2/m-figure.png" not in back.files
    monkeypatch.setattr(journal_module, "put_file", put)
    assert journal.flush()
    [back] = Journal(tmp_path).records()
    assert "step-2/m-figure.png" in back.files and back.missing_files == {}


def test_values_go_out_at_once_and_the_whole_record_once_its_figures_are_filed(tmp_path):
    journal, sink = Journal(tmp_path), MemorySink()
    delivery = Delivery(journal, [sink], run="")
    record = _journalled(journal)
    delivery.send_values([record])
    assert [(r.scalars, r.files) for r in sink.records] == [({"x": 1.5}, [])]  # values, no files yet
    assert journal.delivered("memory", "memory") == set()
    assert delivery.send_pending() == 0  # a replay does not send it whole before its figures
    journal.add_figures(record, {"m-figure.png": PNG})
    delivery.send_files([record])
    assert sink.records[-1].files == ["step-2/m.json", "step-2/m.npz", "step-2/m-figure.png"]
    assert journal.delivered("memory", "memory") == {record.record_id}
    assert delivery.send_pending() == 0 and len(sink.records) == 2


@pytest.mark.parametrize("missing", [False, True])
def test_a_record_never_filed_is_sent_whole_by_a_later_process(tmp_path, missing):
    journal, sink = Journal(tmp_path), MemorySink()
    record = _journalled(journal)
    Delivery(journal, [sink], run="").send_values([record])  # the process stops before its figures
    if not missing:
        journal.add_figures(record, {"m-figure.png": PNG})
    later = MemorySink()
    assert Delivery(Journal(tmp_path), [later], run="").send_pending() == 1
    assert ("step-2/m-figure.png" in later.records[0].files) is not missing

"""Issue 29, section 2: hostile or odd content on disk crashes nothing.

The seeds of the fuzz test (tests/reliability/test_fuzz_run_folder.py), each pinned:

- deep nesting: a line of 200,000 nested ``[`` in ``journal.jsonl`` or ``deliveries.jsonl``,
  and the same in a checkpoint's ``trainer_state.json``, are skipped and counted (one
  problem each), not a ``RecursionError`` out of ``Trainer.train()``, ``uma report``,
  ``uma sync`` or the backfill's discovery;
- schema-valid but odd content: a checksummed record whose ``meta.timestamp_ms`` is
  ``"abc"`` or ``10**30`` is delivered with the time of delivery (it blocked all delivery);
  ``uma report`` draws the rest when a pruning ``meta.config`` is a string, scalars are
  +-1e308, a result JSON's ``scalars`` is a list, an ``.npz`` is not a zip or holds objects,
  and a ``.safetensors`` is corrupt.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.mlflow_store import mlflow_store
from uma_callbacks.cli import main
from uma_callbacks.core.records import Record
from uma_callbacks.core.safe_json import MAX_DEPTH, UnreadableJSON, loads_bounded, read_json
from uma_callbacks.engine.journal import DELIVERIES_FILE, Journal, append_line

DEEP = "[" * 200_000


def _record(step: int, metric: str = "m", **kwargs) -> Record:
    kwargs.setdefault("scalars", {"x": float(step)})
    return Record(step=step, metric=metric, status="ok", cache_key=f"{metric}-{step}", **kwargs)


def _journal(tmp_path: Path, records: list[Record]) -> Journal:
    journal = Journal(tmp_path / "run" / "uma")
    for record in records:
        journal.append(record)
    return journal


def _mlflow_run(tmp_path: Path) -> tuple[str, str]:
    from mlflow.tracking import MlflowClient

    uri = mlflow_store(tmp_path)
    client = MlflowClient(uri)
    return uri, client.create_run(client.create_experiment("hostile")).info.run_id


def _steps(uri: str, run_id: str, key: str = "uma/m/x") -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


# ---------------------------------------------------------------------- the bounded reader
def test_bounded_reader_refuses_what_json_loads_crashes_on(tmp_path):
    assert loads_bounded('{"a": [1, 2.5, "[[["]}') == {"a": [1, 2.5, "[[["]}
    assert loads_bounded("[" * MAX_DEPTH + "]" * MAX_DEPTH) is not None
    for text, why in [
        (DEEP, "deeper"),
        ('{"a":' * 5000 + "1" + "}" * 5000, "deeper"),
        ("NaN", "non-finite"),
        ('{"x": 1e999}', "finite"),
        (b"\xff\xfe[1]", "UnicodeDecodeError"),
        ("[1, 2", "JSONDecodeError"),
        ("9" * 5000, "ValueError"),  # more digits than int() takes
    ]:
        with pytest.raises(UnreadableJSON, match=why):
            loads_bounded(text)
    with pytest.raises(UnreadableJSON, match="longer"):
        loads_bounded("[1]" + " " * 100, max_bytes=50)
    fifo = tmp_path / "state.json"
    os.mkfifo(fifo)
    with pytest.raises(UnreadableJSON, match="not a regular file"):
        read_json(fifo)  # no writer: a plain open() would block forever
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "missing.json")


# ---------------------------------------------------------------------- deep nesting
@pytest.mark.slow
def test_deep_line_in_journal_and_deliveries_is_skipped_by_report_and_sync(tmp_path, capsys):
    journal = _journal(tmp_path, [_record(1), _record(2)])
    with open(journal.path, "a") as fh:
        fh.write(DEEP + "\n")
    journal.append(_record(3))
    with open(journal.root / DELIVERIES_FILE, "a") as fh:
        fh.write(DEEP + "\n")
    fresh = Journal(journal.root)
    assert [r.step for r in fresh.records()] == [1, 2, 3] and fresh.bad_lines == 1
    assert main(["report", str(tmp_path / "run")]) == 0
    assert "1 line(s) skipped" in capsys.readouterr().out
    uri, run_id = _mlflow_run(tmp_path)
    assert main(["sync", str(tmp_path / "run"), "--mlflow-run", run_id, "--tracking-uri", uri]) == 0
    assert _steps(uri, run_id) == [1, 2, 3]


@pytest.mark.slow
def test_deep_journal_line_and_result_file_do_not_stop_training(tmp_path):
    from tests.trainer_cases import run_trainer
    from uma_callbacks import UMACallback

    root = tmp_path / "run" / "uma"
    (root / "step-2").mkdir(parents=True)
    (root / "journal.jsonl").write_text(DEEP + "\n")
    (root / "step-2" / "gradient_flow.json").write_text(DEEP)  # read by the save to keep other configs apart
    cb = UMACallback(metrics=["gradient_flow"], probe_size=4, draw_figures=False)
    run_trainer(tmp_path / "run", callbacks=[cb], max_steps=2, save_steps=2)
    journal = Journal(root)
    assert [(r.step, r.status) for r in journal.records() if r.metric == "gradient_flow"] == [(2, "ok")]
    assert journal.bad_lines == 1


def test_deep_trainer_state_is_one_problem_not_an_aborted_discovery(tmp_path):
    import torch
    from safetensors.torch import save_file

    from uma_callbacks.checkpoints import discover_with_problems

    for step in (2, 4):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text(DEEP)
    found, problems = discover_with_problems(tmp_path)
    assert [c.step for c in found] == [2]
    assert [(p.name, "deeper" in r) for p, r in problems] == [("checkpoint-4", True)]


# ---------------------------------------------------------------------- odd but checksummed content
@pytest.mark.slow
def test_odd_timestamps_deliver_every_record(tmp_path):
    journal = _journal(tmp_path, [_record(s, meta={"timestamp_ms": 1_700_000_000_000}) for s in (1, 2)])
    for step, odd in [(3, "abc"), (4, 10**30), (5, -5), (6, [1])]:  # checksummed: valid lines
        append_line(journal.path, _record(step, meta={"timestamp_ms": odd}).to_dict())
    journal.append(_record(7, meta={"timestamp_ms": 1_700_000_000_000}))
    uri, run_id = _mlflow_run(tmp_path)
    assert main(["sync", str(tmp_path / "run"), "--mlflow-run", run_id, "--tracking-uri", uri]) == 0
    assert _steps(uri, run_id) == [1, 2, 3, 4, 5, 6, 7]


def _report_ok(tmp_path: Path) -> str:
    assert main(["report", str(tmp_path / "run")]) == 0
    return (tmp_path / "run" / "uma" / "report.html").read_text(encoding="utf-8")


def test_report_with_a_string_pruning_config_leaves_that_step_out_alone(tmp_path):
    records = [
        _record(s, "pruning", scalars={"mask_distance_prev": 0.1 * s}, meta={"config": {"eb_threshold": 0.1}})
        for s in (1, 2, 3)
    ]
    records[0].meta["config"] = "a string"
    _journal(tmp_path, records)
    page = _report_ok(tmp_path)
    assert (tmp_path / "run" / "uma" / "pruning-trend.png").is_file()  # drawn from steps 2 and 3
    assert "pruning (config unknown) at step 1" in page  # left out, and named


def test_report_with_scalars_of_1e308(tmp_path):
    huge = [_record(2, scalars={"x": 1e308}), _record(3, scalars={"x": -1e308})]
    _journal(tmp_path, [_record(1), *huge, _record(4)])
    page = _report_ok(tmp_path)
    assert "1e+308" in page  # in the table, beyond the figure's range


def _with_file(tmp_path: Path, name: str, content: bytes) -> None:
    journal = _journal(tmp_path, [_record(1)])
    folder = journal.root / "step-2"
    folder.mkdir()
    (folder / name).write_bytes(content)
    journal.append(_record(2, files=[f"step-2/{name}"]))
    journal.append(_record(3))


def test_report_with_a_result_json_whose_scalars_is_a_list(tmp_path, capsys):
    _with_file(tmp_path, "m.json", json.dumps({"name": "m", "scalars": [1, 2], "meta": {}}).encode())
    _report_ok(tmp_path)
    assert "1 result file(s) unreadable" in capsys.readouterr().out


def test_report_with_an_npz_that_is_not_a_zip(tmp_path):
    _with_file(tmp_path, "m.npz", b"\x93NUMPY not really" * 10)
    assert "m.npz" in _report_ok(tmp_path)


def test_report_with_an_npz_holding_objects(tmp_path):
    folder = tmp_path / "objects"
    folder.mkdir()
    np.savez(folder / "m.npz", x=np.array([{"a": 1}, None], dtype=object))
    _with_file(tmp_path, "m.npz", (folder / "m.npz").read_bytes())
    assert "m.npz" in _report_ok(tmp_path)


def test_report_with_a_corrupt_safetensors(tmp_path):
    _with_file(tmp_path, "m.safetensors", (2**40).to_bytes(8, "little") + b"{garbage")
    assert "m.safetensors" in _report_ok(tmp_path)


def test_deep_or_odd_backfill_config_file_is_bad_input(tmp_path, capsys):
    for i, text in enumerate([DEEP, '{"metrics": {"hessian": "top_k=2"}}']):
        config = tmp_path / f"config-{i}.json"
        config.write_text(text)
        assert main(["backfill", str(tmp_path), "--config", str(config)]) == 2
        assert "--config" in capsys.readouterr().err

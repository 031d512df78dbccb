"""Journal: self-checking lines, torn writes, cache lookup, deliveries, safe paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uma_callbacks.core.records import Record
from uma_callbacks.engine.journal import Journal, cache_key, safe_name
from uma_callbacks.metrics.base import MetricResult


def _record(step=1, metric="m", key="k", status="ok", **scalars):
    return Record(step=step, metric=metric, status=status, scalars=scalars or {"x": 1.0}, cache_key=key)


def test_append_and_read_back(tmp_path):
    j = Journal(tmp_path)
    j.append(_record(1, x=1.5))
    j.append(_record(2, x=float("nan")))
    records = j.records()
    assert [r.step for r in records] == [1, 2]
    assert records[0].scalars["x"] == 1.5 and np.isnan(records[1].scalars["x"])


def test_torn_last_line_is_ignored_and_reported(tmp_path):
    j = Journal(tmp_path)
    j.append(_record(1))
    j.append(_record(2))
    data = j.path.read_bytes()
    j.path.write_bytes(data[: len(data) - 20])  # kill -9 in the middle of the last write
    assert [r.step for r in j.records()] == [1]
    assert j.bad_lines == 1
    j.append(_record(3))  # appending after a torn line still works
    assert [r.step for r in j.records()] == [1, 3]


def test_a_flipped_byte_is_detected(tmp_path):
    j = Journal(tmp_path)
    j.append(_record(1, x=2.0))
    text = j.path.read_text().replace('"x":2.0', '"x":3.0')
    j.path.write_text(text)
    assert j.records() == [] and j.bad_lines == 1


def test_cache_lookup_only_ok_records(tmp_path):
    j = Journal(tmp_path)
    key = cache_key("ckpt", {"metric": "m", "a": 1}, "probe")
    assert key != cache_key("ckpt", {"metric": "m", "a": 2}, "probe")
    j.append(_record(1, key=key, status="error"))
    assert j.lookup(key) is None
    j.append(_record(1, key=key))
    assert j.lookup(key).status == "ok"


def test_files_round_trip(tmp_path):
    j = Journal(tmp_path, save_tensors=True)
    result = MetricResult(
        name="fisher", scalars={"trace": 2.0}, arrays={"top_eigenvalues": np.array([3.0, 1.0])},
        tensors={"w": torch.ones(2, 2)},
    )
    files = j.write_files(result, step=5)
    assert files == ["step-5/fisher.json", "step-5/fisher.npz", "step-5/fisher.safetensors"]
    record = _record(5, metric="fisher")
    record.files = files
    back = j.load_result(record)
    assert back.scalars["trace"] == 2.0
    assert back.arrays["top_eigenvalues"].tolist() == [3.0, 1.0]
    assert torch.equal(back.tensors["w"], torch.ones(2, 2))


def test_deliveries(tmp_path):
    j = Journal(tmp_path)
    j.mark_delivered("mlflow", "run1", "a")
    j.mark_delivered("mlflow", "run2", "b")
    assert j.delivered("mlflow", "run1") == {"a"}


@pytest.mark.parametrize("name", ["../../etc/passwd", "a/b c", "..", "layer.0/attn"])
def test_safe_name_never_leaves_the_folder(name, tmp_path):
    cleaned = safe_name(name)
    assert "/" not in cleaned and ".." not in cleaned and " " not in cleaned
    assert (tmp_path / cleaned).resolve().parent == tmp_path.resolve()


def test_artifact_outside_root_refused(tmp_path):
    j = Journal(tmp_path / "uma")
    with pytest.raises(ValueError, match="escapes"):
        j.add_files([tmp_path / "elsewhere.png"])

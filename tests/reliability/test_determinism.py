"""Determinism: the same config and seed give bit-identical values in two separate processes (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

_SCRIPT = """
import sys, torch
from tests.cases import qwen2_case
from tests.reliability.test_model_safety import _build
from uma_callbacks.engine.journal import Journal
from uma_callbacks.metrics import METRICS
from uma_callbacks.engine.probe import Probe
from uma_callbacks.engine.suite import MetricSuite

model, batches, loss_fn = qwen2_case(dtype=torch.float32)
metrics = [_build(name, model) for name in sorted(METRICS)]
metrics += [METRICS["fisher"](kind="mc", top_k=2, seed=3)]  # sampled labels, from a recorded seed
metrics[-1].name = "fisher_mc"
records = MetricSuite(metrics, journal=Journal(sys.argv[1]), loss_fn=loss_fn, draw_figures=False,
                      use_cache=False).run(model, Probe(batches), step=1)
# metrics comparing checkpoints have no earlier one here (skipped); capped Lanczos may be partial
done = ("ok", "partial", "skipped")
assert all(r.status in done for r in records), [(r.metric, r.error) for r in records if r.status not in done]
"""


def _read(folder: Path) -> dict:
    out = {}
    for line in (folder / "journal.jsonl").read_text().splitlines():
        record = json.loads(line)["record"]
        out[record["metric"]] = record["scalars"]
        files = [f for f in record["files"] if f.endswith(".json")]
        if files:
            out[record["metric"] + ":arrays"] = json.loads((folder / files[0]).read_text())["arrays"]
    return out


def _run_both(folders: list[Path]) -> list[dict]:
    """The two processes run side by side (two cores), each bounded in time."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _SCRIPT, str(f)], env=env, cwd=REPO) for f in folders]
    try:
        codes = [proc.wait(timeout=300) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    assert codes == [0, 0]
    return [_read(f) for f in folders]


@pytest.mark.slow
def test_two_processes_give_bit_identical_values(tmp_path):
    first, second = _run_both([tmp_path / "a", tmp_path / "b"])
    assert set(first) >= {"gradient_flow", "fisher", "hessian", "landscape", "interpolation", "fisher_mc"}
    for key in first:
        assert first[key] == second[key], key  # exact: JSON round-trips floats bit for bit

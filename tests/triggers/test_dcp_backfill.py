"""Backfill of sharded (DCP) checkpoints equals the backfill of the same weights as safetensors.

Slow: the run folder comes from one real ``torchrun --nproc_per_node 2`` (``fully_shard`` per
decoder layer, Accelerate's ``save_fsdp_model``/``save_fsdp_optimizer``; see
``tests/core/dcp_run.py``): ``checkpoint-2`` and ``checkpoint-4`` with ``pytorch_model_fsdp_0/``,
``optimizer_0/``, ``trainer_state.json`` and ``config.json``, beside the same weights gathered
by FSDP and saved with safetensors.
"""

from __future__ import annotations

import math

import pytest

from tests.cases import ragged_lm_batches
from tests.core.dcp_run import sharded_run
from uma_callbacks.triggers.backfill import backfill


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.slow
def test_dcp_backfill_equals_the_safetensors_backfill(tmp_path):
    run = sharded_run()
    probe = ragged_lm_batches(vocab=40)
    summaries = {
        layout: backfill(
            run / layout,
            metrics=["gradient_flow", "fisher"],
            probe=probe,
            trackers=[],
            output_dir=tmp_path / layout,
            progress=False,
            draw_figures=False,
        )
        for layout in ("dcp", "safetensors")
    }
    for summary in summaries.values():
        assert summary.ok, summary.describe()
        assert [c.step for c in summary.checkpoints] == [2, 4]
    sharded, full = summaries["dcp"], summaries["safetensors"]
    for step in (2, 4):
        assert sharded.per_checkpoint[step]["shards"] == 2  # gathered from the two ranks' files
        assert sharded.per_checkpoint[step]["gathered_bytes"] > 0
        assert "shards" not in full.per_checkpoint[step]
    want = {(r.step, r.metric): r for r in full.records}
    assert sorted(want) == sorted((r.step, r.metric) for r in sharded.records)
    assert {m for _, m in want} == {"gradient_flow", "fisher", "trajectory"}
    for record in sharded.records:
        ref = want[(record.step, record.metric)]
        first_trajectory = (record.step, record.metric) == (2, "trajectory")  # no earlier checkpoint yet
        assert record.status == ref.status == ("skipped" if first_trajectory else "ok"), record.error
        assert sorted(record.scalars) == sorted(ref.scalars)
        for key, value in ref.scalars.items():
            got = record.scalars[key]
            assert (math.isnan(got) and math.isnan(value)) or _rel(got, value) <= 1e-6, (
                record.step,
                key,
                got,
                value,
            )

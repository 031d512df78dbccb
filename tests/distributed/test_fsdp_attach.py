"""``attach()`` on an FSDP2 (``fully_shard``) model in an Accelerate loop under ``torchrun --nproc_per_node 2``.

Slow: ``tests/scripts/fsdp_attach.py`` under torchrun (a float64 tiny Qwen2 sharded per
decoder layer, ``Accelerator(cpu=True)`` with the optimizer and dataloader prepared and the
model given to ``attach(model=)``, ``save_state`` at steps 2 and 4, the cache on), checked
against the same metrics in one process on the gathered weights. Its ranks also run
test_fsdp.py's and test_distributed.py's scripts (one torchrun: the ``two_rank_runs``
fixture).
"""

from __future__ import annotations

import json
import math

import pytest

NAMES = ("gradient_flow", "fisher", "landscape", "interpolation")


@pytest.fixture(scope="module")
def run(two_rank_runs):
    """``(summary, MLflow store, folder)`` of the Accelerate loop (the ``two_rank_runs`` fixture runs it under torchrun)."""
    out = two_rank_runs["attach"]
    return json.loads((out / "fsdp_attach.json").read_text()), two_rank_runs["attach_uri"], out


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.slow
def test_prepare_refuses_a_sharded_model_so_attach_takes_it(run):
    """On MULTI_CPU ``accelerator.prepare(model)`` wraps a fully_shard-ed model in DDP, which
    fails on its DTensors (what the README says); ``attach(model=)`` measures it instead."""
    summary, _, _ = run
    for checks in summary["checks"]:
        assert checks["distributed_type"] == "DistributedType.MULTI_CPU"
        assert checks["prepare_model"] != "accepted" and "DTensor" in checks["prepare_model"]


@pytest.mark.slow
def test_records_equal_one_process_on_the_gathered_weights(run):
    """Every scalar of gradient_flow, fisher (top-3 Lanczos on sharded products), landscape
    and interpolation at both saves equals the one-process value, float64, to 1e-6."""
    summary, _, _ = run
    assert summary["world_size"] == 2
    records = {(r["step"], r["metric"]): r for r in summary["records"]}
    for step in summary["steps"]:
        for metric in NAMES:
            record = records[(step["step"], metric)]
            if metric == "interpolation" and step["step"] == 2:
                assert record["status"] == "skipped"  # no previous checkpoint yet
                continue
            assert record["status"] == "ok", record["error"]
            assert record["meta"]["sharded"] is True and record["meta"]["world_size"] == 2
            want = step["single"][metric]
            assert want
            for key, value in want.items():
                got = record["scalars"][key]
                if isinstance(value, float) and math.isnan(value):
                    assert math.isnan(got), key
                else:
                    assert _rel(got, value) < 1e-6, (step["step"], metric, key, got, value)


@pytest.mark.slow
def test_shards_bit_identical_after_each_save(run):
    summary, _, _ = run
    for checks in summary["checks"]:
        assert checks["bit_identical_2"] and checks["bit_identical_4"]


@pytest.mark.slow
def test_fingerprint_same_on_every_rank_equal_to_one_process_without_gathering(run):
    """The cache key's fingerprint: equal on both ranks, equal to the one-process fingerprint
    of the gathered weights, computed without one ``full_tensor()`` (shards streamed); the
    records carry it, and the unchanged weights at step 6 come from the cache."""
    summary, _, _ = run
    prints = {c["fingerprint"] for c in summary["checks"]}
    assert prints == {summary["steps"][-1]["reference_fingerprint"]}
    assert all(c["fingerprint_full_tensor_calls"] == 0 for c in summary["checks"])
    by_step = {r["step"]: r["checkpoint"] for r in summary["records"]}
    assert by_step[2] == summary["steps"][0]["reference_fingerprint"]
    assert by_step[4] == by_step[6] == summary["steps"][1]["reference_fingerprint"]
    statuses = summary["checks"][0]["statuses_6"]
    assert statuses == {"gradient_flow": "cached", "fisher": "cached", "landscape": "cached", "interpolation": "ok"}


@pytest.mark.slow
def test_only_rank_zero_journals_and_logs_to_mlflow(run):
    from mlflow.tracking import MlflowClient

    summary, uri, _ = run
    assert [c["journal"] for c in summary["checks"]] == [True, False]
    # 4 + 4 measured, then at step 6 one measured (interpolation) and three cache hits, which a
    # live run journals as its own records (so its replays and `uma sync` carry them)
    assert summary["journal_lines"] == 12
    client = MlflowClient(uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert [r.info.run_id for r in runs] == summary["mlflow_run_ids"]  # one run: rank 0's
    history = client.get_metric_history(summary["mlflow_run_ids"][0], "uma/gradient_flow/total_norm")
    assert sorted(m.step for m in history) == [2, 4, 6]  # once per measurement


@pytest.mark.slow
def test_planned_fixed_bytes_per_rank_below_one_rank(run):
    """The planner's fixed bytes on each of 2 ranks (shard + largest gathered block) are
    below those of the same model on 1 rank (shard = whole model), for every metric."""
    summary, _, _ = run
    for checks in summary["checks"]:
        held, full, gathered = checks["rank_param_bytes"]
        assert held * 2 == full and 0 < gathered < full
        planned = checks["planned_fixed_bytes_2_vs_1"]
        assert set(planned) == set(NAMES)
        for metric, (two, one) in planned.items():
            assert two < one, (metric, two, one)

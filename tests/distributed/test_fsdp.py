"""Metrics on an FSDP2 (``fully_shard``) model under ``torchrun --nproc_per_node 2`` (gloo, CPU).

Slow: ``tests/scripts/fsdp_metrics.py`` under torchrun (a float64 tiny Qwen2 sharded per
decoder layer, two training steps, a :class:`~uma_callbacks.session.Session` measuring after
each), checked against the same metrics in one process on the gathered weights. Its ranks
also run test_fsdp_attach.py's and test_distributed.py's scripts (one torchrun: the
``two_rank_runs`` fixture).
"""

from __future__ import annotations

import json
import math

import pytest


@pytest.fixture(scope="module")
def summary(two_rank_runs):
    """The bare loop's summary (the ``two_rank_runs`` fixture runs the script under torchrun)."""
    return json.loads((two_rank_runs["fsdp"] / "fsdp_result.json").read_text())


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _records(step: dict) -> dict[str, dict]:
    return {r["metric"]: r for r in step["records"]}


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["gradient_flow", "fisher", "landscape", "interpolation"])
def test_sharded_equals_one_process(summary, metric):
    """Every scalar (totals, per-module and per-parameter traces, top-k Fisher eigenvalues;
    the landscape's grid statistics and orthogonality from directions drawn per full tensor;
    the interpolation path from the previous checkpoint's shards) equals the one-process
    value on the gathered weights and the same probe, to 1e-6."""
    assert summary["world_size"] == 2
    for step in summary["steps"]:
        record = _records(step)[metric]
        if metric == "interpolation" and step["step"] == 1:
            assert record["status"] == "skipped"  # no previous checkpoint yet
            continue
        assert record["status"] == "ok", record["error"]
        assert record["meta"]["world_size"] == 2 and record["meta"]["sharded"] is True
        want = step["single"][metric]
        assert want, "no reference scalars"
        for key, value in want.items():
            got = record["scalars"][key]
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(got), key
            else:
                assert _rel(got, value) < 1e-6, (step["step"], key, got, value)


@pytest.mark.slow
def test_fisher_diagonal_shards_equal_rows_of_the_full_diagonal(summary):
    """Each rank's Fisher diagonal is its shard (reduce-scattered, never all-gathered) and
    equals those rows of the one-process diagonal."""
    for checks in summary["checks"]:
        for step in (1, 2):
            assert checks[f"diag_rel_err_{step}"] < 1e-10


@pytest.mark.slow
def test_lean_landscape_layer_norms_and_split_1d_params_equal_one_process(summary):
    """Directions regenerated block by block (``mode="lean"``), layer norms summed over ranks,
    1-D parameters (split over the ranks) perturbed: the same grid as one process."""
    for checks in summary["checks"]:
        for step in (1, 2):
            assert checks[f"lean_rel_err_{step}"] < 1e-10


@pytest.mark.slow
def test_shards_bit_identical_and_still_dtensors(summary):
    for checks in summary["checks"]:
        assert checks["all_dtensor"]
        assert checks["bit_identical_1"] and checks["bit_identical_2"]
        shard, full, largest = checks["shard_bytes"]
        assert shard * 2 >= full > shard and largest < full  # each rank holds half, one block gathered at most


@pytest.mark.slow
def test_hessian_skipped_with_reason(summary):
    for step in summary["steps"]:
        record = _records(step)["hessian"]
        assert record["status"] == "skipped"
        assert "double backward" in record["error"]["message"] and "FSDP" in record["error"]["message"]


@pytest.mark.slow
def test_failure_on_one_rank_is_one_record_on_both(summary):
    """Rank 1 raises before its forward; rank 0 does not hang in FSDP's all-gather, both
    ranks record the same error, and the metrics after it still run."""
    for step in (1, 2):
        statuses = [checks[f"statuses_{step}"] for checks in summary["checks"]]
        assert statuses[0] == statuses[1]
        errors = [checks[f"errors_{step}"]["fails_on_rank1"] for checks in summary["checks"]]
        assert all("rank 1 broke before its forward" in e for e in errors), errors
        assert dict(statuses[0])["fails_on_rank1"] == "error"


@pytest.mark.slow
def test_only_rank_zero_journals(summary):
    assert [c["journal"] for c in summary["checks"]] == [True, False]
    assert summary["journal_lines"] == sum(len(s["records"]) for s in summary["steps"])


@pytest.mark.slow
def test_fisher_top_k_by_lanczos_on_sharded_vectors(summary):
    """FisherInformation(top_k=3) under FSDP2 runs Lanczos on this rank's pieces of the
    vectors (the basis holds the local shards' entries, about half the model per rank), with
    inner products summed over ranks: the top eigenvalues equal one process's Lanczos and its
    exact Gram spectrum to 1e-6, with the chunks' gradients cached or recomputed per product
    (every rank running as many chunks: one rank's extra chunk is a ghost on the other); after
    the second training step."""
    for checks in summary["checks"]:
        got = checks["lanczos_2"]
        assert got["methods"] == ["lanczos", "lanczos", "lanczos"] and got["converged"]
        assert len(got["eigs"]) == 3
        streamed, cached = got["streamed"]
        assert cached is False and len(streamed) == 3
        for a, b, c, d in zip(got["eigs"], got["lanczos_one"], got["gram_one"], streamed):
            assert _rel(a, b) < 1e-6 and _rel(a, c) < 1e-6 and _rel(d, c) < 1e-6, got
        sharded, in_session, local, full, one = got["entries"]
        assert sharded == in_session == local and one == full
        assert full / 2 - 64 <= local < full * 0.6  # shard-sized (dim-0 rows split in two)


@pytest.mark.slow
def test_planner_prices_the_fisher_basis_on_the_shard(summary):
    """The memory planner prices the Fisher Lanczos basis (and its work vectors) on this
    rank's entries, as the sharded Lanczos holds it: about half the one-rank basis."""
    for checks in summary["checks"]:
        got = checks["planned_lanczos"]
        assert got["saved"] == got["expected_saved"] > 0
        assert got["basis_full"] / 2 * 0.99 <= got["basis_shard"] < got["basis_full"] * 0.6

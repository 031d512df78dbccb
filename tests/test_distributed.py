"""DDP: sharded probe == one process, rank-0-only logging, failure agreement without hangs.

Fast: the :class:`AgreeingCollective` protocol on threads that all-reduce through a
``threading.Barrier`` (a hang shows up as a broken barrier, not a stuck test).
Slow: a ``torchrun --nproc_per_node 2`` (gloo, CPU, float64) Trainer run, checked against
one process on the saved checkpoints (its ranks also run the FSDP2 scripts of
tests/distributed/: the ``two_rank_runs`` fixture).
"""

from __future__ import annotations

import copy
import json
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.cases import mlp_case
from uma_callbacks.core.distributed import AgreeingCollective, Collective, PeerFailure
from uma_callbacks.engine.probe import Probe
from uma_callbacks.engine.suite import MetricSuite
from uma_callbacks.metrics import GradientFlow
from uma_callbacks.metrics.base import ComputeContext, Metric, MetricResult


class _ThreadGroup:
    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=20)
        self.slots: list[torch.Tensor | None] = [None] * world


class ThreadCollective(Collective):
    """All-reduce (sum) between threads: a test double for a process group."""

    def __init__(self, group: _ThreadGroup, rank: int) -> None:
        self.group, self.rank, self.world_size = group, rank, group.world

    def sum_(self, tensors):
        for t in tensors:
            self.group.slots[self.rank] = t.detach().clone()
            self.group.barrier.wait()
            total = self.group.slots[0].clone()
            for other in self.group.slots[1:]:
                total = total + other  # a size mismatch raises here, on every rank
            self.group.barrier.wait()
            t.copy_(total)

    def barrier(self):
        self.group.barrier.wait()


class Reduces(Metric):
    """Reduces ``n_reductions`` times; raises on ``fail_rank`` after ``fail_after`` of them."""

    name = "reduces"

    def __init__(self, n_reductions=3, fail_rank=None, fail_after=0, sizes=None):
        super().__init__()
        self.n_reductions, self.fail_rank, self.fail_after = n_reductions, fail_rank, fail_after
        self._sizes = sizes or {}

    def _compute(self, ctx: ComputeContext) -> MetricResult:
        total = 0.0
        n = self._sizes.get(ctx.collective.rank, self.n_reductions)
        for i in range(n):
            if ctx.collective.rank == self.fail_rank and i == self.fail_after:
                raise RuntimeError(f"rank {self.fail_rank} broke at reduction {i}")
            t = torch.ones(2, dtype=torch.float64)
            ctx.collective.sum_([t])
            total += float(t.sum())
        if ctx.collective.rank == self.fail_rank and self.fail_after >= n:
            raise RuntimeError(f"rank {self.fail_rank} broke after its reductions")
        return MetricResult(name=self.name, scalars={"total": total})


def _run_ranks(world, metrics_for_rank):
    """Run a MetricSuite on ``world`` threads; returns each rank's records."""
    model, batches, loss_fn = mlp_case()
    probe = Probe(batches)
    group = _ThreadGroup(world)
    out: dict[int, object] = {}

    def worker(rank):
        try:
            suite = MetricSuite(metrics=metrics_for_rank(), collective=ThreadCollective(group, rank), loss_fn=loss_fn)
            out[rank] = suite.run(copy.deepcopy(model), probe, step=5)
        except BaseException as err:  # surfaced by the assertion below
            out[rank] = err

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    for rank in range(world):
        assert not isinstance(out[rank], BaseException), out[rank]
    return out, (model, batches, loss_fn)


@pytest.mark.parametrize(
    "world, fail_rank, fail_after",
    [(2, 1, 0), (2, 0, 0), (2, 1, 2), (2, 1, 3), (3, 2, 1)],
    ids=["r1-before-first", "r0-before-first", "r1-midway", "r1-after-all", "3ranks-r2-midway"],
)
def test_failure_on_one_rank_is_agreed_by_all_and_the_next_metric_is_right(world, fail_rank, fail_after):
    out, (model, batches, loss_fn) = _run_ranks(
        world, lambda: [Reduces(3, fail_rank, fail_after), GradientFlow(), Reduces(2)]
    )
    single = GradientFlow().compute(copy.deepcopy(model), batches, loss_fn)
    for rank in range(world):
        failed, flow, after = out[rank]
        assert failed.status == "error"
        assert "broke" in failed.error["message"]  # the culprit's own message reaches every rank
        assert flow.status == "ok" and after.status == "ok"
        assert after.scalars["total"] == 2 * 2 * world
        for key in ("total_norm", "noise_scale"):
            assert flow.scalars[key] == pytest.approx(single.scalars[key], rel=1e-12)


def test_disagreeing_number_of_reductions_fails_everywhere_without_hanging():
    out, _ = _run_ranks(2, lambda: [Reduces(3, sizes={1: 2}), Reduces(1)])
    for rank in range(2):
        mismatch, after = out[rank]
        assert mismatch.status == "error" and "disagree" in mismatch.error["message"]
        assert after.status == "ok" and after.scalars["total"] == 4


def test_guard_refuses_after_conclusion():
    guard = AgreeingCollective(Collective())
    assert guard.conclude(failed=False) is False
    with pytest.raises(PeerFailure):
        guard.sum_([torch.ones(1)])


# ---------------------------------------------------------------------- torchrun
def _single_process(out: Path, step: int, names: list[str]):
    """The metrics in one process on checkpoint-<step>'s weights and the same probe."""
    from safetensors.torch import load_file

    from tests.scripts.ddp_trainer import shared_probe
    from tests.trainer_cases import tiny_lm
    from uma_callbacks.metrics import METRICS

    model = tiny_lm().double()
    model.load_state_dict(load_file(str(out / f"checkpoint-{step}" / "model.safetensors")))
    probe = shared_probe()
    results, seconds = {}, {}
    for name in names:
        started = time.perf_counter()
        results[name] = METRICS[name]().compute(model, probe.batches)
        seconds[name] = time.perf_counter() - started
    return results, seconds, probe.fingerprint


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process_and_log_once(two_rank_runs):
    """tests/scripts/ddp_trainer.py under torchrun (the ``two_rank_runs`` fixture, whose ranks
    also run the FSDP2 scripts), into its own MLflow store."""
    from mlflow.tracking import MlflowClient

    from tests.scripts.ddp_trainer import measured_metrics

    uri, out = two_rank_runs["ddp_uri"], two_rank_runs["ddp"]
    summary = json.loads((out / "ddp_result.json").read_text())
    assert summary["world_size"] == 2
    names = measured_metrics()
    records = summary["records"]
    # each checkpoint measured once, by every metric, in order; failures agreed
    assert [(r["step"], r["metric"]) for r in records] == [
        (s, m) for s in (2, 4) for m in ["fails_early", names[0], "fails_late", *names[1:]]
    ]
    for r in records:
        if r["metric"].startswith("fails_"):
            assert r["status"] == "error" and "rank 1" in r["error"]["message"], r["error"]
        else:
            assert r["status"] == "ok" and r["meta"]["world_size"] == 2, r
    # rank 1 computed the same numbers but wrote nothing
    rank1 = json.loads((out / "rank1_records.json").read_text())
    assert [(r["step"], r["metric"], r["status"]) for r in rank1] == [(r["step"], r["metric"], r["status"]) for r in records]
    deliveries = (out / "uma" / "deliveries.jsonl").read_text().splitlines()
    assert len(deliveries) == len(records)  # every record reached the MLflow sink once
    journal_lines = (out / "uma" / "journal.jsonl").read_text().splitlines()
    assert len(journal_lines) == len(records)  # one journal line per record: rank 0 only
    client = MlflowClient(uri)
    history = client.get_metric_history(summary["mlflow_run_id"], "uma/gradient_flow/total_norm")
    assert sorted(m.step for m in history) == [2, 4]  # exactly once per checkpoint
    # sharded over 2 ranks == one process on the whole probe, float64, to 1e-6 relative
    timing = {}
    for step in (2, 4):
        single, seconds, fingerprint = _single_process(out, step, names)
        assert fingerprint == summary["probe_fingerprint"]
        for r in records:
            if r["step"] != step or r["metric"] not in names:
                continue
            ref = single[r["metric"]].scalars
            keys = ["total_norm", "noise_scale"] if r["metric"] == "gradient_flow" else ["trace"]
            keys += [k for k in ref if k.startswith("layers/") and k.endswith(("/norm", "/trace"))]
            assert len(keys) > 3
            for key in keys:
                assert r["scalars"][key] == pytest.approx(ref[key], rel=1e-6), (step, r["metric"], key)
            timing[(step, r["metric"])] = (r["meta"]["seconds"], seconds[r["metric"]])
    print("metric wall time, 2 ranks vs 1 process (s):", {f"{k[1]}@{k[0]}": v for k, v in timing.items()})

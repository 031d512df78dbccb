"""A Trainer run with UMACallback under ``torchrun --nproc_per_node 2`` (gloo, CPU, float64).

For ``tests/test_distributed.py``, whose fixture runs it on the ranks of the FSDP2 scripts
(one torchrun: ``tests/scripts/two_rank_runs.py``), or alone. The callback measures, besides the real
metrics, two that fail on rank 1 only: ``fails_early`` raises *before* a reduction that
rank 0 makes (without agreement, rank 0 would wait in that all-reduce forever) and
``fails_late`` raises after it. The metrics after them must still be right.

Rank 0 writes ``<out>/ddp_result.json``: the records, each metric's seconds and the probe
fingerprint. Usage::

    torchrun --nproc_per_node 2 tests/scripts/ddp_trainer.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for tests.*

from tests.trainer_cases import tiny_lm, tiny_lm_dataset, training_args  # noqa: E402
from uma_callbacks.engine.probe import Probe, pad_collate  # noqa: E402
from uma_callbacks.metrics import METRICS  # noqa: E402
from uma_callbacks.metrics.base import ComputeContext, Metric, MetricResult  # noqa: E402

PROBE_SIZE = 12


def shared_probe() -> Probe:
    """The probe every rank (and the single-process reference in the test) builds."""
    return Probe.from_dataset(tiny_lm_dataset(n=24, seed=7), PROBE_SIZE, batch_size=4, seed=3, collate_fn=pad_collate)


def measured_metrics() -> list[str]:
    """The real metrics compared with one process: gradient flow, and Fisher when present."""
    return ["gradient_flow"] + (["fisher"] if "fisher" in METRICS else [])


class FailsEarly(Metric):
    """Raises on rank 1 before the reduction rank 0 makes."""

    name = "fails_early"

    def _compute(self, ctx: ComputeContext) -> MetricResult:
        if ctx.collective.rank == 1:
            raise RuntimeError("rank 1 broke before reducing")
        total = torch.ones(3, dtype=torch.float64)
        ctx.collective.sum_([total])
        return MetricResult(name=self.name, scalars={"sum": float(total.sum())})


class FailsLate(Metric):
    """Raises on rank 1 after the reduction."""

    name = "fails_late"

    def _compute(self, ctx: ComputeContext) -> MetricResult:
        total = torch.ones(5, dtype=torch.float64)
        ctx.collective.sum_([total])
        if ctx.collective.rank == 1:
            raise ValueError("rank 1 broke after reducing")
        return MetricResult(name=self.name, scalars={"sum": float(total.sum())})


def main() -> None:
    """Train 4 steps on 2 ranks, saving at 2 and 4; rank 0 writes the summary."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    run(Path(args.out))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()  # gloo may abort at exit otherwise


def run(out: Path) -> None:
    """The body of :func:`main`: the Trainer starts the process group, or joins the one already up."""
    from transformers import Trainer

    from uma_callbacks import UMACallback

    names = measured_metrics()
    metrics = [FailsEarly(), *[METRICS[n]() for n in names[:1]], FailsLate(), *[METRICS[n]() for n in names[1:]]]
    cb = UMACallback(metrics=metrics, probe=shared_probe(), trackers=["mlflow"], draw_figures=False, use_cache=False)
    trainer = Trainer(
        model=tiny_lm().double(),
        args=training_args(out, max_steps=4, save_steps=2, ddp_backend="gloo", ddp_timeout=120, save_only_model=True),
        train_dataset=tiny_lm_dataset(n=32),
        callbacks=[cb],
    )
    trainer.train()
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if rank == 0:
        summary = {
            "world_size": world,
            "probe_fingerprint": cb.probe.fingerprint,
            "records": [r.to_dict() for r in cb.records],
            "mlflow_run_id": cb.sinks[0].run_id() if cb.sinks else "",
        }
        (out / "ddp_result.json").write_text(json.dumps(summary))
    else:
        assert cb.journal is None and cb.sinks == []  # only world rank 0 logs
        (out / f"rank{rank}_records.json").write_text(json.dumps([r.to_dict() for r in cb.records]))


if __name__ == "__main__":
    main()

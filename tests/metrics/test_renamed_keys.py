"""The journal holds the honest names: top-k-only spectrum scalars say so, MI names its target."""

from __future__ import annotations

import torch

from tests.cases import bert_case
from uma_callbacks.engine.journal import Journal
from uma_callbacks.engine.probe import Probe
from uma_callbacks.engine.suite import MetricSuite
from uma_callbacks.metrics import FisherInformation, HessianSpectrum, InformationTheory

OLD = ("effective_rank", "condition_number", "mi_target")


def test_the_journal_holds_the_renamed_keys_and_none_of_the_old(tmp_path):
    model, batches, loss_fn = bert_case(torch.float64)
    metrics = [FisherInformation(top_k=2), HessianSpectrum(top_k=2, hutchinson_samples=4), InformationTheory(max_tokens=16)]
    MetricSuite(metrics, journal=Journal(tmp_path), loss_fn=loss_fn, draw_figures=False).run(model, Probe(batches), step=4)
    records = {r.metric: r for r in Journal(tmp_path).records()}
    assert {r.status for r in records.values()} <= {"ok", "partial"}
    for name in ("fisher", "hessian"):
        scalars = records[name].scalars
        assert {"top_k_effective_rank", "top_k_condition_number"} <= set(scalars), name
        assert scalars["top_k_condition_number"] >= 1.0
    info = records["information"].scalars
    assert {"layers/0/mi_next_token", "layers/0/mi_label"} <= set(info)
    every = [key for r in records.values() for key in r.scalars]
    assert not [k for k in every if k.rsplit("/", 1)[-1] in OLD]

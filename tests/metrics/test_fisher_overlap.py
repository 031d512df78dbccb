"""FisherOverlap against per-task float64 oracles."""

from __future__ import annotations

import math

import pytest
import torch

from tests.cases import mlp_case
from tests.oracles import oracle_per_sample_grads, param_slices
from uma_callbacks.metrics.fisher import top_percent_mask
from uma_callbacks.metrics.fisher_overlap import (
    FisherOverlap,
    diagonal_cosine,
    fisher_weighted_conflict,
    mask_jaccard,
)


def _per_task(model, batches, loss_fn):
    _, G = oracle_per_sample_grads(model, batches, loss_fn)
    sl = param_slices(model)
    return {n: (G**2).mean(0)[s] for n, s in sl.items()}, {n: G.mean(0)[s] for n, s in sl.items()}


@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_overlap_matches_oracle(method):
    model, batches, loss_fn = mlp_case(n_batches=2, batch_size=5)
    tasks = {"math": [batches[0]], "code": [batches[1]]}
    got = FisherOverlap(tasks, top_percent=20, method=method, chunk_size=2).compute(model, None, loss_fn)
    fa, ga = _per_task(model, tasks["math"], loss_fn)
    fb, gb = _per_task(model, tasks["code"], loss_fn)
    assert got.scalars["tasks/math/trace"] == pytest.approx(sum(float(f.sum()) for f in fa.values()), rel=1e-6)
    ma, mb = top_percent_mask(fa, 20), top_percent_mask(fb, 20)
    assert got.scalars["pairs/math/code/jaccard"] == pytest.approx(mask_jaccard(ma, mb), rel=1e-12)
    assert got.scalars["pairs/math/code/cosine"] == pytest.approx(diagonal_cosine(fa, fb), rel=1e-6)
    w = {n: (fa[n] * fb[n]).sqrt() for n in fa}
    dot = sum(float((w[n] * ga[n] * gb[n]).sum()) for n in w)
    na = sum(float((w[n] * ga[n] ** 2).sum()) for n in w)
    nb = sum(float((w[n] * gb[n] ** 2).sum()) for n in w)
    assert got.scalars["pairs/math/code/conflict"] == pytest.approx(-dot / math.sqrt(na * nb), rel=1e-6)
    assert got.scalars["pairs/math/code/conflict"] == pytest.approx(fisher_weighted_conflict(fa, fb, ga, gb), rel=1e-6)


def test_overlap_of_a_task_with_itself():
    model, batches, loss_fn = mlp_case()
    got = FisherOverlap({"a": batches, "b": batches}, top_percent=10).compute(model, None, loss_fn)
    assert got.scalars["pairs/a/b/jaccard"] == 1.0
    assert got.scalars["pairs/a/b/cosine"] == pytest.approx(1.0)
    assert got.scalars["pairs/a/b/conflict"] == pytest.approx(-1.0)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"tasks": {"a": [{"x": torch.zeros(2, 3)}]}}, "tasks"),
        ({"tasks": {"a/b": [1], "c": [1]}}, "tasks"),
        ({"tasks": {"a": [], "c": [1]}}, "tasks"),
        ({"tasks": {"a": [1], "c": [1]}, "top_percent": 0}, "top_percent"),
        ({"tasks": {"a": [1], "c": [1]}, "kind": "exact"}, "kind"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        FisherOverlap(**kwargs)


def _restricted(names):
    return lambda d: {n: d[n] for n in names}


def test_per_module_values_match_the_oracle_restricted_to_each_module():
    model, batches, loss_fn = mlp_case(n_batches=2, batch_size=5)
    tasks = {"math": [batches[0]], "code": [batches[1]]}
    got = FisherOverlap(tasks, top_percent=30).compute(model, None, loss_fn)
    fa, ga = _per_task(model, tasks["math"], loss_fn)
    fb, gb = _per_task(model, tasks["code"], loss_fn)
    ma, mb = top_percent_mask(fa, 30), top_percent_mask(fb, 30)  # the global masks, restricted per module
    for module in ("fc1", "fc2", "head"):
        names = [f"{module}.weight", f"{module}.bias"]
        only = _restricted(names)
        key = f"layers/{module}/pairs/math/code"
        inter = sum(int((ma[n] & mb[n]).sum()) for n in names)
        union = sum(int((ma[n] | mb[n]).sum()) for n in names)
        if union:
            assert got.scalars[f"{key}/jaccard"] == pytest.approx(inter / union, rel=1e-12)
        else:
            assert math.isnan(got.scalars[f"{key}/jaccard"])
        dot = sum(float((fa[n] * fb[n]).sum()) for n in names)
        norm = math.sqrt(sum(float((fa[n] ** 2).sum()) for n in names) * sum(float((fb[n] ** 2).sum()) for n in names))
        assert got.scalars[f"{key}/cosine"] == pytest.approx(dot / norm, rel=1e-6)
        want = fisher_weighted_conflict(only(fa), only(fb), only(ga), only(gb))
        assert got.scalars[f"{key}/conflict"] == pytest.approx(want, rel=1e-6)


def test_default_tasks_are_the_probe_halves():
    from uma_callbacks.metrics import METRICS
    from uma_callbacks.metrics.fisher_overlap import split_halves

    model, batches, loss_fn = mlp_case(n_batches=2, batch_size=5)
    assert METRICS["fisher_overlap"] is FisherOverlap
    got = FisherOverlap(top_percent=20).compute(model, batches, loss_fn)
    halves = split_halves(batches)
    want = FisherOverlap(halves, top_percent=20).compute(model, None, loss_fn)
    assert [h["x"].shape[0] for h in halves["even"]] == [3, 3] and [h["x"].shape[0] for h in halves["odd"]] == [2, 2]
    assert got.scalars == want.scalars and "pairs/even/odd/jaccard" in got.scalars

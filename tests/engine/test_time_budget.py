"""The compute budget of a save: predictions, shares, scaling order, and a Trainer run."""

from __future__ import annotations

import pytest

from uma_callbacks.engine.time_budget import UnitCosts, share_budget
from uma_callbacks.metrics import CheckpointInterpolation, GradientFlow, HessianSpectrum, LossLandscape

UNITS = UnitCosts(forward=0.1, backward=0.3, hvp=0.75, n_batches=4)


def test_hessian_scales_hutchinson_first_then_lanczos_then_top_k():
    full = HessianSpectrum(top_k=10, hutchinson_samples=50)
    assert full.time_cost(UNITS) == pytest.approx((65 + 50) * 0.75)  # 65 products by default
    _, changes = full.scaled_to(65 * 0.75 + 20 * 0.75, UNITS)
    assert list(changes) == ["hutchinson_samples"] and changes["hutchinson_samples"] == [50, 20]
    assert full.hutchinson_samples == 50  # the configured metric is never changed
    tight, changes = full.scaled_to(10 * 0.75, UNITS)
    # never below the probes that keep the trace's standard error near |trace| / 3 (18 before
    # any trace was measured): the rest is taken from Lanczos and top_k
    assert tight.hutchinson_samples == 18 and tight.top_k == 1
    assert tight.time_cost(UNITS) == pytest.approx(full.min_time_cost(UNITS))


def test_landscape_and_interpolation_shrink_their_grid_keeping_it_odd():
    grid, changes = LossLandscape(n_points=21).scaled_to(49 * 0.1, UNITS)
    assert grid.n_points == 7 and grid.n_points % 2 == 1 and changes["n_points"] == [21, 7]
    path, _ = CheckpointInterpolation(n_points=13).scaled_to(9 * 0.1, UNITS)
    assert path.n_points == 7
    fits, changes = LossLandscape(n_points=5).scaled_to(100.0, UNITS)
    assert changes == {} and fits.n_points == 5


def test_cheap_metrics_get_what_they_need_and_the_rest_is_shared():
    metrics = [GradientFlow(), HessianSpectrum(), LossLandscape()]
    shares = share_budget(metrics, UNITS, 40.0)
    assert shares[0] == pytest.approx(metrics[0].time_cost(UNITS))
    assert shares[1] == pytest.approx(shares[2]) and sum(shares) == pytest.approx(40.0)
    assert share_budget(metrics, UNITS, 1e6) == pytest.approx([m.time_cost(UNITS) for m in metrics])


def test_a_budget_too_small_for_all_drops_the_costliest_floor_first_and_shares_the_rest():
    metrics = [GradientFlow(), HessianSpectrum(), LossLandscape()]
    # the Hessian's floor is 21 products (15.75 s): out; the landscape's fits what is left
    shares = share_budget(metrics, UNITS, 4.0)
    assert shares[1] == 0.0 and shares[0] == pytest.approx(metrics[0].time_cost(UNITS))
    assert shares[2] == pytest.approx(4.0 - shares[0])
    # below every floor but the cheapest: only gradient flow runs, with the whole budget it needs
    shares = share_budget(metrics, UNITS, 0.5)  # the landscape's floor: 25 points x 1 of 4 batches
    assert shares == pytest.approx([metrics[0].time_cost(UNITS), 0.0, 0.0])
    assert share_budget(metrics, UNITS, 0.1) == [0.0, 0.0, 0.0]


def test_the_sharing_never_asks_which_metric_it_is():
    """Time cost and scaling live on each metric: the budget's source names none of them."""
    import re
    from pathlib import Path

    from uma_callbacks.engine import time_budget
    from uma_callbacks.metrics import METRICS

    source = Path(time_budget.__file__).read_text(encoding="utf-8")
    assert [name for name in METRICS if re.search(rf"\b{name}\b", source)] == []
    assert ".name ==" not in source and ".name in" not in source


def test_a_metric_without_knobs_costs_a_backward_and_a_half_and_keeps_its_config():
    from uma_callbacks.metrics import FisherInformation

    metric = GradientFlow()
    assert metric.time_cost(UNITS) == pytest.approx(1.5 * 0.3)
    assert metric.scaled_to(0.0, UNITS) == (metric, {})
    assert metric.min_time_cost(UNITS) == metric.time_cost(UNITS)
    assert FisherInformation().scaled_to(0.0, UNITS)[1] == {}


def test_floors_are_each_metric_scaled_as_far_as_it_goes():
    hessian = HessianSpectrum(top_k=10, hutchinson_samples=50)
    assert hessian.min_time_cost(UNITS) == pytest.approx(21 * 0.75)  # 18 probes and 3 products (top_k 1)
    landscape = LossLandscape(n_points=21)
    assert landscape.min_time_cost(UNITS) == pytest.approx(25 * 0.1 / 4)  # 5 x 5 points on 1 of 4 batches
    _, changes = landscape.scaled_to(0.0, UNITS)
    assert changes == {"n_points": [21, 5], "n_batches": [None, 1]} and landscape.n_points == 21


def test_bad_budget_fields_are_value_errors():
    from uma_callbacks import UMAConfig

    for field, value in (("overhead", 0), ("overhead", -0.1), ("seconds_per_save", float("inf")), ("overhead", "5%")):
        with pytest.raises(ValueError, match=f"UMAConfig.{field}"):
            UMAConfig(**{field: value})


@pytest.mark.slow
def test_trainer_run_stays_within_its_budget_and_says_what_it_scaled(tmp_path):
    from tests.trainer_cases import run_trainer, tiny_lm_dataset
    from uma_callbacks import UMACallback

    budget = 2.0
    callback = UMACallback(
        metrics=["gradient_flow", "hessian", "landscape"], probe=tiny_lm_dataset(n=8, seed=3), probe_size=8,
        trackers=[], draw_figures=False, seconds_per_save=budget, log_scalars=["gradient_flow/total_norm"],
    )  # fmt: skip
    trainer, _ = run_trainer(tmp_path, callbacks=[callback], max_steps=4, save_steps=2)
    for step in (2, 4):
        records = [r for r in callback.records if r.step == step]
        assert all("compute_budget" in r.meta for r in records)
        spent = sum(r.meta.get("seconds", 0.0) for r in records)
        # each metric may overrun its share by 3x or 2 s at most (then it stops, a timeout)
        assert spent <= 3 * budget + 2 * len(records), [(r.metric, r.status, r.meta.get("seconds")) for r in records]
        for record in records:  # what ran is what the plan said: the scaled settings are the record's config
            for knob, (_, after) in record.meta["compute_budget"]["scaled"].items():
                assert record.status != "ok" or record.meta["config"][knob] == after
    logged = [entry for entry in trainer.state.log_history if "uma/gradient_flow/total_norm" in entry]
    ok_steps = sorted(r.step for r in callback.records if r.metric == "gradient_flow" and r.status == "ok")
    assert [entry["step"] for entry in logged] == ok_steps

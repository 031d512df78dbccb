"""Measurement when the loss spikes: the detector against the exact robust z-score, and real Trainer runs.

The spike is injected by multiplying the learning rate by 1000 for one step's update (step 8):
the loss logged at step 9 is computed on the weights that update left, about 18.8 nats
against 3.9 before. The runs with and without the callback both get the same injection.
"""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerCallback

from tests.mlflow_store import mlflow_store
from tests.trainer_cases import run_trainer, tiny_lm_dataset
from uma_callbacks import UMACallback, UMAConfig
from uma_callbacks.core.spike import SpikeDetector, SpikeTrigger, robust_stats
from uma_callbacks.engine.journal import Journal
from uma_callbacks.session import check_trigger_settings

KICK_STEP = 8  # its update is taken with 1000x the learning rate
SPIKE_STEP = KICK_STEP + 1  # the first loss computed on the kicked weights
TRIGGER = {"key": "loss", "z": 6.0, "window": 5, "cooldown": 100}


class LrKick(TrainerCallback):
    """Multiply the learning rate of one step's update (the scheduler sets it back at the next step)."""

    def __init__(self, step: int = KICK_STEP, factor: float = 1000.0) -> None:
        self.step, self.factor = step, factor

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step + 1 == self.step:
            for group in optimizer.param_groups:
                group["lr"] *= self.factor


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("mlflow")
    base = tmp_path_factory.mktemp("spike")
    plain_trainer, plain = run_trainer(base / "plain", callbacks=[LrKick()], max_steps=12, save_steps=3)
    cb = UMACallback(
        metrics=["gradient_flow"],
        probe=tiny_lm_dataset(n=8, seed=1),
        probe_size=8,
        trackers=["mlflow"],
        spike=SpikeTrigger(**TRIGGER),
        spike_metrics=["gradient_flow"],
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_store(base))
        trainer, measured = run_trainer(base / "measured", callbacks=[LrKick(), cb], max_steps=12, save_steps=3)
    return SimpleNamespace(
        base=base, plain=plain, measured=measured, cb=cb, trainer=trainer,
        plain_weights=_weights(plain_trainer), weights=_weights(trainer),
    )  # fmt: skip


# ---------------------------------------------------------------------- Trainer runs
@pytest.mark.slow
def test_one_spike_record_at_its_step_with_its_z_and_training_bit_identical(runs):
    cb = runs.cb
    assert len(runs.plain) == 12 and runs.plain == runs.measured  # every logged loss, exact float equality
    assert runs.plain_weights.keys() == runs.weights.keys()
    assert all(torch.equal(runs.plain_weights[k], runs.weights[k]) for k in runs.weights)

    markers = [r for r in cb.records if r.metric == "spike"]
    assert [(r.step, r.status) for r in markers] == [(SPIKE_STEP, "ok")]
    marker = markers[0]
    losses = dict(runs.measured)
    window = [losses[s] for s in range(SPIKE_STEP - TRIGGER["window"], SPIKE_STEP)]
    median, scale, kind = robust_stats(window)
    assert marker.scalars["value"] == losses[SPIKE_STEP]
    assert marker.scalars["z"] == pytest.approx(abs(losses[SPIKE_STEP] - median) / scale, rel=1e-12)
    assert marker.scalars["z"] > TRIGGER["z"] and kind == "mad"
    assert marker.meta["spike"]["trigger"] == {**TRIGGER, "z": 6.0} and marker.meta["metrics"] == ["spike/gradient_flow"]

    at_spike = [r for r in cb.records if r.metric.startswith("spike/")]
    assert [(r.step, r.metric, r.status) for r in at_spike] == [(SPIKE_STEP, "spike/gradient_flow", "ok")]
    assert at_spike[0].meta["spike"]["z"] == marker.scalars["z"]
    saves = [(r.step, r.status) for r in cb.records if r.metric == "gradient_flow"]
    assert saves == [(3, "ok"), (6, "ok"), (9, "ok"), (12, "ok")]  # the save at the spike's step is kept too
    # on_log and on_save at step 9 see the same weights (after step 9's update): the same values
    save_9 = next(r for r in cb.records if r.metric == "gradient_flow" and r.step == SPIKE_STEP)
    assert at_spike[0].scalars == pytest.approx(save_9.scalars, rel=1e-9)
    assert at_spike[0].cache_key == "" and save_9.status == "ok"  # no cache shared with the checkpoint

    journal = Journal(runs.base / "measured" / "uma").records()
    kept = [(r.step, r.metric, r.run) for r in journal if r.step == SPIKE_STEP]
    run = cb.session.run
    assert sorted(kept) == [(9, "gradient_flow", run), (9, "spike", run), (9, "spike/gradient_flow", run)]
    assert (runs.base / "measured" / "uma" / "step-9" / "spike_gradient_flow.json").is_file()
    assert (runs.base / "measured" / "uma" / "step-9" / "gradient_flow.json").is_file()


@pytest.mark.slow
def test_mlflow_holds_the_spike_apart_from_the_checkpoints_each_key_once_per_step(runs):
    from mlflow.tracking import MlflowClient

    sink = runs.cb.sinks[0]
    client = MlflowClient(sink.tracking_uri)
    run_id = sink.run_id()
    marker = next(r for r in runs.cb.records if r.metric == "spike")
    z = client.get_metric_history(run_id, "uma/spike/z")
    assert [(m.step, m.value) for m in z] == [(SPIKE_STEP, pytest.approx(marker.scalars["z"]))]
    assert [m.step for m in client.get_metric_history(run_id, "uma/spike/value")] == [SPIKE_STEP]
    assert [m.step for m in client.get_metric_history(run_id, "uma/spike/gradient_flow/total_norm")] == [SPIKE_STEP]
    assert [m.step for m in client.get_metric_history(run_id, "uma/gradient_flow/total_norm")] == [3, 6, 9, 12]


@pytest.mark.slow
def test_report_draws_the_spike_and_lists_it(runs, tmp_path):
    pytest.importorskip("matplotlib")
    from uma_callbacks.report import spike_markers, write_report

    png, page = write_report(runs.base / "measured", out_dir=tmp_path)
    assert png.stat().st_size > 0
    text = page.read_text(encoding="utf-8")
    assert "<h2 id='spikes'>Spikes</h2>" in text
    z = next(r for r in runs.cb.records if r.metric == "spike").scalars["z"]
    assert f"<li>step {SPIKE_STEP}: loss = " in text and f"z = {z:.6g}" in text and "measured: spike/gradient_flow" in text
    assert [r.step for r in spike_markers(Journal(runs.base / "measured" / "uma"))] == [SPIKE_STEP]
    # right below the figure, with what its marks mean, before the rest of the page
    assert text.index("metrics across steps") < text.index("<h2 id='spikes'>") < text.index("<h2>Values</h2>")
    assert "A red dashed line on every panel marks a step" in text and "A red cross is a metric measured" in text


def test_each_spike_line_is_named_in_the_panel_legend():
    from uma_callbacks.report import _spike_label

    def marker(step, z, key="loss"):
        return SimpleNamespace(step=step, scalars={"z": z}, meta={"spike": {"key": key}})

    assert _spike_label([marker(9, 12.345)]) == ["loss spike, z=12.3"]
    labels = _spike_label([marker(s, 7.0, "grad_norm") for s in range(5)])
    assert labels == ["grad_norm spike, z=7"] * 3 + ["2 more spike(s)", "_nolegend_"]


@pytest.mark.slow
def test_no_spike_no_record(tmp_path):
    cb = UMACallback(
        metrics=["gradient_flow"], probe=tiny_lm_dataset(n=8, seed=1), probe_size=8, trackers=[], spike=SpikeTrigger(**TRIGGER)
    )
    _, losses = run_trainer(tmp_path / "out", callbacks=[cb], max_steps=12, save_steps=100)
    assert len(losses) == 12
    assert [(r.step, r.metric) for r in cb.records] == [(12, "gradient_flow")]  # the final save's only
    assert cb.spike.events == []
    assert cb.spike.detector.exact_checks > 0  # it did look: 7 full windows


# ---------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"key": "eval_loss"}, "SpikeTrigger.key"),
        ({"key": None}, "SpikeTrigger.key"),
        ({"z": 0}, "SpikeTrigger.z"),
        ({"z": -1.0}, "SpikeTrigger.z"),
        ({"z": math.inf}, "SpikeTrigger.z"),
        ({"z": True}, "SpikeTrigger.z"),
        ({"window": 4}, "SpikeTrigger.window"),
        ({"window": 5.0}, "SpikeTrigger.window"),
        ({"cooldown": -1}, "SpikeTrigger.cooldown"),
        ({"cooldown": 1.5}, "SpikeTrigger.cooldown"),
    ],
)
def test_bad_spike_trigger_raises_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        UMACallback(spike=SpikeTrigger(**kwargs))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"spike": "loss"}, "UMAConfig.spike must be None or a SpikeTrigger"),
        ({"spike_metrics": ["gradient_flow"]}, "UMAConfig.spike_metrics needs spike="),
        ({"spike": SpikeTrigger(), "spike_metrics": ["fisher"]}, r"UMAConfig.spike_metrics entries .* one of \['gradient_flow'\]"),
        ({"spike": SpikeTrigger(), "spike_metrics": []}, "UMAConfig.spike_metrics must be"),
        ({"spike": SpikeTrigger(), "spike_metrics": "gradient_flow"}, "UMAConfig.spike_metrics must be"),
        ({"spike": SpikeTrigger(), "measure": "async"}, "UMAConfig.spike cannot be used with measure='async'"),
    ],
)
def test_bad_spike_config_raises_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UMAConfig(metrics=["gradient_flow"], **kwargs)


def test_spike_metrics_exclude_metrics_comparing_checkpoints():
    config = UMAConfig(metrics=["gradient_flow", "interpolation"], spike=SpikeTrigger())
    assert config.spike_metric_names == ["gradient_flow"]
    with pytest.raises(ValueError, match="compares checkpoints"):
        UMAConfig(metrics=["gradient_flow", "interpolation"], spike=SpikeTrigger(), spike_metrics=["interpolation"])
    with pytest.raises(ValueError, match="UMAConfig.spike: none of the configured metrics"):
        UMAConfig(metrics=["interpolation"], spike=SpikeTrigger())


@pytest.mark.parametrize("source", ["accelerate", "lightning", "backfill"])
def test_other_triggers_refuse_spike(source):
    with pytest.raises(ValueError, match=r"spike.*UMAConfig.spike="):
        check_trigger_settings(UMAConfig(metrics=["gradient_flow"], spike=SpikeTrigger()), source)


# ---------------------------------------------------------------------- the detector
def _feed(detector: SpikeDetector, values, first_step: int = 1):
    return [detector.update(v, step) for step, v in enumerate(values, first_step)]


def test_detection_starts_when_the_window_is_full_and_the_window_slides():
    detector = SpikeDetector(SpikeTrigger(window=5, z=4.0, cooldown=0))
    assert _feed(detector, [1.0, 1.1, 0.9, 50.0, 1.0]) == [None] * 5  # the window is filling: no decision
    # window [1.0, 1.1, 0.9, 50.0, 1.0]: median 1.0, MAD 0.1 -> 1.3 is 2.02 robust sd away
    assert detector.update(1.3, 6) is None
    event = detector.update(3.0, 7)  # window [1.1, 0.9, 50, 1.0, 1.3]: median 1.1, MAD 0.2 (50 barely counts)
    assert event is not None and event.step == 7 and event.z == pytest.approx(1.9 / (1.4826 * 0.2))
    _feed(detector, [1.0, 1.0, 1.0], 8)  # 50.0 has left the window
    assert len(detector._values) == 5 and 50.0 not in detector._values


def test_cooldown_counts_steps_after_a_spike():
    detector = SpikeDetector(SpikeTrigger(window=5, z=4.0, cooldown=3))
    _feed(detector, [1.0, 1.1, 0.9, 1.05, 0.95], 1)
    assert detector.update(10.0, 6).step == 6
    assert detector.update(20.0, 7) is None and detector.update(30.0, 8) is None  # steps 7, 8 < 6 + 3
    event = detector.update(1000.0, 9)
    assert event is not None and event.step == 9


def test_mad_zero_falls_back_to_the_mean_absolute_deviation_and_no_spread_detects_nothing():
    detector = SpikeDetector(SpikeTrigger(window=5, z=4.0, cooldown=0))
    _feed(detector, [2.0, 2.0, 2.0, 2.0, 7.0])  # MAD 0; mean |x - 2| = 1
    event = detector.update(20.0, 6)
    assert event is not None and event.scale_kind == "mean_abs_dev" and event.scale == pytest.approx(1.2533)
    assert event.z == pytest.approx(18.0 / 1.2533)
    flat = SpikeDetector(SpikeTrigger(window=5, z=4.0, cooldown=0))
    assert _feed(flat, [3.0] * 5 + [1e6]) == [None] * 6  # every value equal: no spread, no z-score


def test_non_finite_values_are_neither_spikes_nor_in_the_window():
    detector = SpikeDetector(SpikeTrigger(window=5, z=4.0, cooldown=0))
    _feed(detector, [1.0, 1.1, 0.9, 1.05, 0.95])
    assert _feed(detector, [math.nan, math.inf, -math.inf], 6) == [None] * 3
    assert list(detector._values) == [1.0, 1.1, 0.9, 1.05, 0.95]


def _exact(trigger: SpikeTrigger, values):
    """The definition, recomputed from scratch at every value."""
    window: list[float] = []
    quiet = -1
    out = []
    for step, v in enumerate(values, 1):
        event = None
        if math.isfinite(v):
            if len(window) == trigger.window and step >= quiet:
                median, scale, _ = robust_stats(window)
                if scale > 0 and abs(v - median) / scale > trigger.z:
                    event = (step, abs(v - median) / scale)
                    quiet = step + max(trigger.cooldown, 1)
            window = (window + [v])[-trigger.window :]
        out.append(event)
    return out


def test_decisions_equal_the_exact_computation_at_every_value():
    rng = random.Random(0)
    for _ in range(600):
        trigger = SpikeTrigger(
            window=rng.choice([5, 6, 7, 10, 21, 50]), z=rng.choice([0.5, 1.0, 3.0, 4.0, 8.0]), cooldown=rng.choice([0, 1, 3, 20])
        )
        kind, level, values = rng.random(), 3.0, []
        for _ in range(rng.randint(1, 200)):
            if kind < 0.2:
                v = rng.choice([1.0, 2.0, 2.0, 2.0])  # ties: MAD 0 often
            elif kind < 0.3:
                v = round(rng.gauss(2.0, 0.1), 1)
            else:
                level *= 0.999
                v = level + rng.gauss(0.0, 0.05)
            u = rng.random()
            v = v * rng.choice([3.0, 10.0, 0.1]) if u < 0.03 else (rng.choice([math.nan, math.inf]) if u > 0.995 else v)
            values.append(v)
        detector = SpikeDetector(trigger)
        fast = [None if e is None else (e.step, e.z) for e in _feed(detector, values)]
        assert fast == _exact(trigger, values), trigger


def test_the_precheck_spares_most_sorts_on_a_noisy_loss():
    rng = random.Random(1)
    detector = SpikeDetector(SpikeTrigger(window=50, z=4.0, cooldown=100))
    n = 5000
    _feed(detector, [3.0 * 0.9999**i + rng.gauss(0.0, 0.05) for i in range(n)])
    assert detector.exact_checks < 0.35 * (n - 50)  # measured about 1 in 5 at w=50


def test_report_escapes_a_hostile_spike_record(tmp_path):
    pytest.importorskip("matplotlib")
    from uma_callbacks.core.records import Record
    from uma_callbacks.report import write_report

    journal = Journal(tmp_path)
    for step, norm in ((3, 1.0), (6, 2.0)):
        journal.append(Record(step=step, metric="gradient_flow", status="ok", scalars={"total_norm": norm}))
    journal.append(
        Record(
            step=4, metric="spike", status="ok", scalars={"z": 9.0, "value": 5.0},
            meta={"spike": {"key": "<script>alert(1)</script>", "window_values": "<i>"}, "metrics": ["<b>x</b>"]},
        )  # fmt: skip
    )
    journal.flush()
    _, page = write_report(tmp_path)
    text = page.read_text(encoding="utf-8")
    assert "<li>step 4: &lt;script&gt;alert(1)&lt;/script&gt; = 5, z = 9 " in text
    assert "<script>" not in text and "<b>x" not in text and "<i>" not in text

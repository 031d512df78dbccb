"""Representations against float64 brute force: spectra, pairs, dense Grams, the centred CKA formula."""

from __future__ import annotations

import copy
import itertools
import math
import warnings

import numpy as np
import pytest
import torch

from tests.cases import qwen2_case
from tests.mlflow_store import mlflow_store
from uma_callbacks.metrics.base import CheckpointState, History
from uma_callbacks.metrics.representations import (
    Representations,
    anisotropy,
    cka_matrix,
    covariance_spectrum,
    linear_cka,
    participation_ratio,
    superposition_interference,
)

REL = 1e-6


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _dense_cov(x):
    xc = x - x.mean(0)
    return xc.T @ xc / (x.shape[0] - 1)


@pytest.mark.parametrize("n,d", [(30, 7), (6, 20)])
def test_covariance_spectrum_and_participation_ratio_match_dense_eigh(n, d):
    x = _randn(n, d) @ _randn(d, d, seed=1)
    lam = torch.linalg.eigh(_dense_cov(x)).eigenvalues.flip(0)
    got = covariance_spectrum(x)
    assert got.shape[0] == min(n, d)
    torch.testing.assert_close(got, lam[: min(n, d)], rtol=REL, atol=1e-10)
    assert participation_ratio(x) == pytest.approx(float(lam.sum() ** 2 / (lam**2).sum()), rel=REL)


def test_anisotropy_is_the_mean_cosine_over_all_distinct_pairs():
    x = _randn(9, 5) + 0.7
    x[3] = 0.0  # a zero state counts as cosine 0
    cos = []
    for i, j in itertools.permutations(range(9), 2):
        ni, nj = x[i].norm(), x[j].norm()
        cos.append(float(x[i] @ x[j] / (ni * nj)) if ni > 0 and nj > 0 else 0.0)
    assert anisotropy(x) == pytest.approx(np.mean(cos), rel=REL)


def test_superposition_and_interference_match_the_dense_gram_of_w():
    w = _randn(12, 5)
    w[4] = 0.0
    gram = w @ w.T  # [h, h], dense
    norms = w.norm(dim=1)
    d_i = []
    for i in range(12):
        if norms[i] == 0:
            d_i.append(0.0)
            continue
        d_i.append(float(norms[i] ** 2 / ((gram[i] / norms[i]) ** 2).sum()))
    unit = torch.where(norms[:, None] > 0, w / norms.clamp_min(1e-300)[:, None], torch.zeros_like(w))
    ug = unit @ unit.T
    inter = [float(ug[i, j] ** 2) for i in range(12) for j in range(12) if i != j]
    sup, got_inter = superposition_interference(w)
    assert sup == pytest.approx(12 / sum(d_i), rel=REL)
    assert got_inter == pytest.approx(np.mean(inter), rel=REL)
    q, _ = torch.linalg.qr(_randn(6, 6, seed=2))
    assert superposition_interference(q * 3.0) == pytest.approx((1.0, 0.0), abs=1e-12)  # orthogonal: none


def _dense_cka(x, y):
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    kx, ky = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return float((kx * ky).sum() / (kx.norm() * ky.norm()))


@pytest.mark.parametrize("n,dx,dy", [(40, 6, 9), (5, 6, 9)])
def test_linear_cka_matches_the_dense_centred_formula(n, dx, dy):
    x, y = _randn(n, dx), _randn(n, dx, seed=1) @ _randn(dx, dy, seed=2) + 0.3 * _randn(n, dy, seed=3)
    assert linear_cka(x, y) == pytest.approx(_dense_cka(x, y), rel=REL)
    assert linear_cka(x, x) == pytest.approx(1.0, rel=1e-12)
    q, _ = torch.linalg.qr(_randn(dx, dx, seed=4))
    assert linear_cka(x, -2.5 * x @ q + 7.0) == pytest.approx(1.0, rel=1e-10)  # rotated, scaled, shifted
    states = [x, y, x @ q]
    got = cka_matrix(states)
    for i, j in itertools.product(range(3), range(3)):
        assert got[i, j] == pytest.approx(_dense_cka(states[i], states[j]), rel=REL)


def _block_outputs(model, batches):
    """Every block's output at every non-padding token, by the test's own hooks ([n, d] per block)."""
    outs, rows = {}, [[] for _ in model.model.layers]
    hs = [b.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o[0] if isinstance(o, tuple) else o))
          for i, b in enumerate(model.model.layers)]
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            for i in outs:
                rows[i].append(outs[i][b["attention_mask"].bool()])
    for h in hs:
        h.remove()
    return [torch.cat(r) for r in rows]


def _history(model, scale=0.05):
    gen = torch.Generator().manual_seed(5)
    states = [
        CheckpointState(step, {n: p.detach() + scale * k * torch.randn(p.shape, generator=gen, dtype=p.dtype)
                               for n, p in model.named_parameters()}, f"fp{k}")
        for k, step in ((1, 20), (2, 0))
    ]
    return History(previous=(states[0],), first=states[1])


def test_every_scalar_on_a_tiny_qwen2_matches_brute_force():
    model, batches, loss_fn = qwen2_case(torch.float64)
    history = _history(model)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    result = Representations(max_tokens=10_000, dead_threshold=0.3).compute(model, batches, loss_fn, history=history)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    states = _block_outputs(model, batches)
    n = states[0].shape[0]
    assert result.meta["n_tokens_used"] == n == result.meta["n_tokens_probe"]
    earlier = {}
    for label, state in (("prev", history.previous[0]), ("first", history.first)):
        other = copy.deepcopy(model)
        other.load_state_dict(dict(state.weights), strict=False)
        earlier[label] = _block_outputs(other, batches)
    # the metric keeps tokens in key order, the oracle in probe order: every scalar is order-free
    for i, x in enumerate(states):
        lam = torch.linalg.eigvalsh(_dense_cov(x))
        s = result.scalars
        assert s[f"layers/{i}/effective_dim"] == pytest.approx(float(lam.sum() ** 2 / (lam**2).sum()), rel=REL)
        unit = x / x.norm(dim=1, keepdim=True)
        cos = unit @ unit.T
        assert s[f"layers/{i}/anisotropy"] == pytest.approx(float((cos.sum() - cos.diagonal().sum()) / (n * (n - 1))), rel=REL)
        sup, inter = superposition_interference(model.model.layers[i].mlp.gate_proj.weight.detach())
        assert s[f"layers/{i}/superposition"] == pytest.approx(sup, rel=REL)
        assert s[f"layers/{i}/interference"] == pytest.approx(inter, rel=REL)
        for label in ("prev", "first"):
            assert s[f"layers/{i}/cka_{label}"] == pytest.approx(_dense_cka(x, earlier[label][i]), rel=REL)
        assert 0.0 <= s[f"layers/{i}/dead_fraction"] <= 1.0
    cka = result.arrays["cka_layers"]
    assert cka[0, 1] == pytest.approx(_dense_cka(states[0], states[1]), rel=REL)
    assert result.meta["eigen_side"] == ["features", "features"]


def test_dead_fraction_counts_units_below_the_threshold_on_every_token():
    model, batches, loss_fn = qwen2_case(torch.float64)
    layer = model.model.layers[0]
    with torch.no_grad():  # units 0..5 of layer 0 are silenced: their gate and up rows are zero
        layer.mlp.gate_proj.weight[:6] = 0.0
        layer.mlp.up_proj.weight[:6] = 0.0
    result = Representations(max_tokens=4, dead_threshold=1e-9).compute(model, batches, loss_fn)
    assert result.scalars["layers/0/dead_fraction"] == pytest.approx(6 / 24)
    assert result.scalars["layers/1/dead_fraction"] == 0.0
    assert Representations(max_tokens=4, dead_threshold=0.999).compute(model, batches, loss_fn).scalars[
        "layers/1/dead_fraction"] == pytest.approx(23 / 24)


def test_cka_is_skipped_alone_without_history_and_reused_when_first_is_previous():
    model, batches, loss_fn = qwen2_case(torch.float64)
    plain = Representations(max_tokens=20).compute(model, batches, loss_fn)
    assert not any("cka_prev" in k or "cka_first" in k for k in plain.scalars)
    assert "no earlier checkpoint" in plain.meta["cka"] and "layers/0/effective_dim" in plain.scalars
    same = CheckpointState(0, {n: p.detach().clone() for n, p in model.named_parameters()}, "fp0")
    result = Representations(max_tokens=20).compute(model, batches, loss_fn, history=History((same,), same))
    for i in range(2):
        assert result.scalars[f"layers/{i}/cka_prev"] == pytest.approx(1.0, rel=1e-12)
        assert result.scalars[f"layers/{i}/cka_first"] == result.scalars[f"layers/{i}/cka_prev"]


def test_named_modules_of_a_plain_network():
    from tests.cases import mlp_case

    model, batches, loss_fn = mlp_case()
    result = Representations(max_tokens=8, modules=["fc1", "fc2"]).compute(model, batches, loss_fn)
    assert result.meta["layers"] == ["fc1", "fc2"] and result.meta["n_tokens_used"] == 8
    sup, _ = superposition_interference(model.fc2.weight.detach())
    assert result.scalars["layers/1/superposition"] == pytest.approx(sup, rel=REL)
    assert result.arrays["cka_layers"].shape == (2, 2)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"max_tokens": 1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"dead_threshold": 1.0}, "dead_threshold"),
        ({"dead_threshold": -0.1}, "dead_threshold"),
        ({"seed": 1.5}, "seed"),
        ({"modules": "model.layers.0"}, "modules"),
        ({"modules": []}, "modules"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"Representations\.{field}"):
        Representations(**kwargs)


def test_bad_module_name_and_an_all_padding_probe_fail_at_compute():
    model, batches, loss_fn = qwen2_case(torch.float64)
    with pytest.raises(ValueError, match=r"Representations\.modules names modules the model does not have"):
        Representations(modules=["model.layers.9"]).compute(model, batches, loss_fn)
    empty = [dict(b, attention_mask=torch.zeros_like(b["attention_mask"])) for b in batches]
    with pytest.raises(ValueError, match="no non-padding tokens"):
        Representations().compute(model, empty, loss_fn)


def test_unified_config_enables_both_families_without_a_warning():
    from uma_callbacks.legacy.unified_config import UnifiedConfig

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        uma = UnifiedConfig(compute_representations=True, compute_information_theory=True, seed=3).to_uma()
    assert uma["metric_names"] == ["representations", "information"]
    assert all(m.seed == 3 for m in uma["metrics"])


def test_figures(tmp_path):
    pytest.importorskip("matplotlib")
    from uma_callbacks.metrics.base import MetricResult
    from uma_callbacks.plots import draw_result, draw_trends

    rep = MetricResult("representations", arrays={"cka_layers": np.array([[1.0, 0.5], [0.5, 1.0]])})
    assert [p.name for p in draw_result(rep, tmp_path)] == ["representations-cka.png"]
    info = [(s, MetricResult("information", arrays={"information_plane": np.array([[1.0 + s, 0.5], [2.0, 0.1 * s]])}))
            for s in (1, 2, 3)]
    paths = draw_trends({"information": info}, tmp_path)
    assert [p.name for p in paths] == ["information-plane.png"] and paths[0].stat().st_size > 0


@pytest.mark.slow
def test_trainer_run_logs_both_families_to_mlflow(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from tests.trainer_cases import run_trainer, tiny_lm_dataset
    from uma_callbacks import UMACallback

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store(tmp_path))
    cb = UMACallback(
        metrics=[Representations(max_tokens=64), "information"], probe=tiny_lm_dataset(n=8, seed=1), probe_size=8,
        trackers=["mlflow"],
    )
    run_trainer(tmp_path / "out", callbacks=[cb], max_steps=4, save_steps=2)
    assert [(r.step, r.metric, r.status) for r in cb.records] == [
        (2, "representations", "ok"), (2, "information", "ok"), (4, "representations", "ok"), (4, "information", "ok"),
    ]
    sink = cb.sinks[0]
    client = MlflowClient(sink.tracking_uri)
    run_id = sink.run_id()
    cka = client.get_metric_history(run_id, "uma/representations/layers/0/cka_prev")
    assert [m.step for m in cka] == [4] and 0.0 < cka[0].value <= 1.0 + 1e-9
    assert [m.step for m in client.get_metric_history(run_id, "uma/information/layers/0/mi_next_token")] == [2, 4]
    assert math.isfinite(client.get_metric_history(run_id, "uma/information/output_entropy")[0].value)


def test_states_of_checkpoints_this_object_measured_are_reused_with_the_same_values():
    model, batches, loss_fn = qwen2_case(torch.float64)
    metric = Representations(max_tokens=30)
    weights = []
    for k in range(3):  # three "checkpoints": measure, then move on
        weights.append(CheckpointState(10 * k, {n: p.detach().clone() for n, p in model.named_parameters()}, f"fp{k}"))
        history = History(tuple(weights[-2:-1]), weights[0] if k else None)
        result = metric.compute(model, batches, loss_fn, history=history)
        fresh = Representations(max_tokens=30).compute(model, batches, loss_fn, history=history)
        assert result.meta.get("cka_reused", []) == (["prev", "first"] if k == 2 else ["prev"] if k == 1 else [])
        assert result.scalars.keys() == fresh.scalars.keys()
        for key, value in fresh.scalars.items():
            assert result.scalars[key] == pytest.approx(value, rel=1e-10), key
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.03 * torch.randn(p.shape, generator=torch.Generator().manual_seed(k), dtype=p.dtype))
    assert len(metric._kept) == 2  # the first and the last checkpoint's states


@pytest.mark.slow
def test_backfill_adds_the_same_cka_values_as_the_live_run(tmp_path):
    from tests.trainer_cases import run_trainer, tiny_lm_dataset
    from uma_callbacks import UMACallback
    from uma_callbacks.engine.probe import save_probe
    from uma_callbacks.triggers.backfill import backfill

    cb = UMACallback(metrics=[Representations(max_tokens=64)], probe=tiny_lm_dataset(n=8, seed=1), probe_size=8,
                     trackers=[], draw_figures=False)
    run_trainer(tmp_path / "run", callbacks=[cb], max_steps=6, save_steps=2)
    save_probe(cb.probe, tmp_path / "run" / "uma")
    summary = backfill(tmp_path / "run", metrics=[Representations(max_tokens=64)], trajectory=False, use_cache=False,
                       output_dir=tmp_path / "fresh", draw_figures=False, progress=False)
    assert summary.computed == 3, summary.describe()
    live = {r.step: r.scalars for r in cb.records}
    assert "layers/0/cka_first" in live[6] and "layers/0/cka_prev" not in live[2]
    for record in summary.records:
        assert set(record.scalars) == set(live[record.step])
        for key, value in live[record.step].items():
            assert record.scalars[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (record.step, key)


def test_a_failure_during_an_earlier_checkpoints_forward_leaves_the_model_exactly_as_it_was():
    model, batches, loss_fn = qwen2_case(torch.float64)
    history = _history(model)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    calls = []

    def boom(module, args, output):
        calls.append(1)
        if len(calls) == len(batches) + 1:  # the first forward of the previous checkpoint's weights
            raise RuntimeError("boom")

    handle = model.model.layers[1].register_forward_hook(boom)
    hooks = {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}
    with pytest.raises(RuntimeError, match="boom"):
        Representations(max_tokens=20).compute(model, batches, loss_fn, history=history)
    handle.remove()
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    hooks[("model.layers.1")] = (hooks["model.layers.1"][0] - 1, hooks["model.layers.1"][1])
    assert {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()} == hooks

"""WeightSpectra against WeightWatcher 0.7.7 and float64 brute force; a backfill with no probe; figures."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from uma_callbacks.metrics import METRICS, WeightSpectra
from uma_callbacks.metrics.weight_spectra import EVALS_THRESHOLD, fit_power_law, spectrum_values


def _heavy_tailed_mlp(seed: int = 0) -> torch.nn.Module:
    """Linear layers of several shapes (wide, tall, square), Student-t and Gaussian entries."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(64, 96), (96, 48), (48, 48), (48, 120), (120, 32)]
    model = torch.nn.Sequential(*[torch.nn.Linear(i, o) for i, o in shapes]).double()
    with torch.no_grad():
        for k, layer in enumerate(model):
            if k % 2 == 0:  # heavy tails: Student-t with 2.5 + k degrees of freedom
                t = torch.distributions.StudentT(torch.tensor(2.5 + k, dtype=torch.float64))
                layer.weight.copy_(0.05 * t.sample(layer.weight.shape))
            else:
                layer.weight.normal_(0.0, 0.05, generator=gen)
    return model


def _unused_probe():
    return [torch.zeros(1)], (lambda m, b: b)


def test_alpha_stable_rank_and_spectral_norm_match_weightwatcher():
    ww = pytest.importorskip("weightwatcher")
    torch.manual_seed(0)
    # float32: WeightWatcher reads a torch weight as float32 (then takes its SVD in float64), so
    # the float32 weights are the matrices both see exactly (ours are cast to float64 losslessly)
    model = _heavy_tailed_mlp().float()
    batches, loss = _unused_probe()
    result = WeightSpectra().compute(model, batches, loss)
    details = ww.WeightWatcher(model=model).analyze(plot=False, mp_fit=False, randomize=False)
    assert result.meta["matrices"] == [str(k) for k in range(len(model))]
    assert len(details) == len(model)
    same_xmin = 0
    for k, row in enumerate(details.itertuples()):
        name = str(k)
        ours = {f: result.arrays[f][k] for f in ("alpha", "alpha_hat", "xmin", "stable_rank", "spectral_norm")}
        # WeightWatcher's spectral_norm is lambda_max = s_max^2 (its sv_max is s_max)
        assert ours["spectral_norm"] ** 2 == pytest.approx(row.spectral_norm, rel=1e-9)
        assert ours["spectral_norm"] == pytest.approx(row.sv_max, rel=1e-9)
        assert ours["stable_rank"] == pytest.approx(row.stable_rank, rel=1e-9)
        assert result.scalars[f"layers/{name}/stable_rank"] == ours["stable_rank"]
        # Both fit the same eigenvalues (s^2 above 1e-5) by the same rule; the singular values
        # come from different LAPACK drivers (scipy's gesdd, torch's), equal to ~1e-15, so the
        # KS distances could only pick another xmin on a near tie of two candidates.
        if ours["xmin"] == pytest.approx(row.xmin, rel=1e-12):
            same_xmin += 1
            assert ours["alpha"] == pytest.approx(row.alpha, rel=1e-3)
            assert ours["alpha_hat"] == pytest.approx(row.alpha_weighted, rel=1e-3)
            assert result.arrays["n_tail"][k] == row.num_pl_spikes
    assert same_xmin == len(model)  # no near tie on these matrices: every xmin is WeightWatcher's


def test_every_value_matches_a_float64_brute_force():
    model = _heavy_tailed_mlp(seed=1)
    result = WeightSpectra(min_evals=20).compute(model, *_unused_probe())
    alphas = []
    for k, layer in enumerate(model):
        w = layer.weight.detach().numpy()
        s = np.linalg.svd(w, compute_uv=False)
        lam = np.sort(s**2)
        data = lam[lam > EVALS_THRESHOLD]
        # Clauset et al. by brute force: every candidate xmin, the KS distance of its MLE fit
        best = (math.inf, None, None)
        for i in range(data.size - 1):
            tail = data[i:]
            a = 1.0 + tail.size / np.log(tail / tail[0]).sum()
            cdf = 1.0 - (tail / tail[0]) ** (1.0 - a)
            d = np.abs(cdf - np.arange(tail.size) / tail.size).max()
            if d < best[0]:
                best = (d, a, tail[0])
        n, m = max(w.shape), min(w.shape)
        edge = (s**2).sum() / (n * m) * (math.sqrt(n) + math.sqrt(m)) ** 2
        want = {
            "alpha": best[1], "xmin": best[2], "ks_distance": best[0],
            "alpha_hat": best[1] * math.log10(lam[-1]), "spectral_norm": s.max(),
            "stable_rank": (s**2).sum() / s.max() ** 2, "mp_softrank": edge / s.max() ** 2,
        }  # fmt: skip
        for field, value in want.items():
            assert result.arrays[field][k] == pytest.approx(value, rel=1e-10), (k, field)
        alphas.append(best[1])
    assert result.scalars["alpha_mean"] == pytest.approx(np.mean(alphas), rel=1e-12)
    assert result.scalars["n_fitted"] == result.scalars["n_matrices"] == len(model)
    lo, hi = int(np.argmin(alphas)), int(np.argmax(alphas))
    assert result.meta["esd"]["esd_min_alpha"]["matrix"] == str(lo)
    np.testing.assert_allclose(
        result.arrays["esd_max_alpha"],
        np.sort(np.linalg.svd(model[hi].weight.detach().numpy(), compute_uv=False) ** 2),
        rtol=1e-12,
    )


def test_power_law_fit_recovers_the_exponent_of_pareto_quantiles_and_refuses_too_few():
    x = (1.0 - (np.arange(2000) + 0.5) / 2000) ** (-1.0 / 2.0)  # alpha = 3
    fit = fit_power_law(np.concatenate([x, np.full(50, 1e-7)]))  # below the threshold: left out
    assert fit.alpha == pytest.approx(3.0, rel=2e-3) and fit.n_tail == 2000
    assert fit_power_law(x[:19]) is None and fit_power_law(x[:19], min_evals=5) is not None
    values = spectrum_values(np.array([2.0, 1.0]), (10, 2), None)
    assert math.isnan(values["alpha"]) and values["stable_rank"] == pytest.approx(1.25)


def test_gpt2_fused_qkv_is_split_into_its_three_blocks():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=24, n_layer=1, n_head=2, vocab_size=40, n_positions=16)).double()
    result = WeightSpectra().compute(model, *_unused_probe())
    names = result.meta["matrices"]
    assert [n for n in names if "c_attn" in n] == [f"transformer.h.0.attn.c_attn.{p}" for p in "qkv"]
    assert "lm_head" not in names  # tied to the embedding: measured once, as transformer.wte
    w = model.transformer.h[0].attn.c_attn.weight.detach()
    for i, part in enumerate("qkv"):
        s = torch.linalg.svdvals(w[:, 24 * i : 24 * (i + 1)])
        got = result.scalars[f"layers/transformer.h.0.attn.c_attn.{part}/spectral_norm"]
        assert got == pytest.approx(float(s.max()), rel=1e-12)


def test_matrices_past_max_entries_are_left_out_and_named():
    model = _heavy_tailed_mlp()
    result = WeightSpectra(max_entries=48 * 48).compute(model, *_unused_probe())
    assert result.meta["matrices"] == ["2"] and result.meta["too_large"] == ["0", "1", "3", "4"]
    with pytest.raises(ValueError, match="no 2-D weight"):
        WeightSpectra(max_entries=10).compute(model, *_unused_probe())


@pytest.mark.parametrize(("kwargs", "field"), [({"min_evals": 1}, "min_evals"), ({"max_entries": 0}, "max_entries")])
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        WeightSpectra(**kwargs)


def test_registered_without_probe_or_gradient():
    assert METRICS["weight_spectra"] is WeightSpectra
    assert WeightSpectra.needs_grad is False and WeightSpectra.history_needed == 0


def test_figure_is_drawn_from_the_result_alone(tmp_path):
    pytest.importorskip("matplotlib")
    from uma_callbacks.plots import draw_result

    result = WeightSpectra().compute(_heavy_tailed_mlp(), *_unused_probe())
    paths = draw_result(result, tmp_path)
    assert [p.name for p in paths] == ["weight_spectra.png"] and paths[0].stat().st_size > 0


def test_backfill_without_a_probe_measures_the_weights_of_every_checkpoint(tmp_path):
    from tests.trainer_cases import tiny_lm
    from uma_callbacks.triggers.backfill import backfill

    run = tmp_path / "run"
    models = {}
    for step in (2, 4):
        models[step] = tiny_lm(seed=step)
        models[step].save_pretrained(run / f"checkpoint-{step}")
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    summary = backfill(run, metrics=["weight_spectra"], trackers=[], progress=False, draw_figures=False)
    assert summary.ok, summary.describe()
    assert [(r.step, r.metric, r.status) for r in summary.records] == [
        (2, "weight_spectra", "ok"), (2, "trajectory", "skipped"), (4, "weight_spectra", "ok"), (4, "trajectory", "ok"),
    ]  # fmt: skip
    for record in summary.records[::2]:
        want = WeightSpectra().compute(models[record.step], *_unused_probe()).scalars
        assert set(record.scalars) - set(want) <= {"over_budget"} and record.scalars.get("over_budget", 0.0) == 0.0
        for key, value in want.items():
            assert record.scalars[key] == pytest.approx(value, rel=1e-12), (record.step, key)
    assert not (run / "uma" / "probe.safetensors").exists()  # the placeholder is never saved as the run's probe
    with pytest.raises(ValueError, match="probe"):  # a metric that reads the probe still needs one
        backfill(run, metrics=["weight_spectra", "gradient_flow"], trackers=[], progress=False, output_dir=tmp_path / "other")

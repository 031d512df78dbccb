"""DirectionalSharpness against the exact double-backward curvature (every scheme, every direction, the update from the history or the pending optimizer step); its cost in counted passes; skips, partial results, cache keys; a Trainer run."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from tests.cases import bert_case, mlp_case, ragged_lm_batches
from tests.mlflow_store import mlflow_store
from uma_callbacks.core.losses import hf_per_sample_loss
from uma_callbacks.metrics import METRICS, DirectionalSharpness
from uma_callbacks.metrics.base import CheckpointState, History, MetricSkipped, SaveResults
from uma_callbacks.metrics.sharpness import GRID, OFFSETS, SCHEMES


def gpt2_case(dtype=torch.float64, seed=0):
    """A tiny GPT-2 (float64 throughout, unlike Qwen2's float32 RMSNorm) on ragged batches."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=40, n_positions=16, bos_token_id=0, eos_token_id=0,
                        attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)  # fmt: skip
    return GPT2LMHeadModel(config).to(dtype), ragged_lm_batches(seed=seed), hf_per_sample_loss


def exact_directional(model, batches, loss_fn, direction):
    """(d^T H d, g . d, g) of L = (1/N) sum_i l_i by double backward in float64 (math attention)."""
    model = copy.deepcopy(model).double().eval()
    batches = [{k: v.double() if v.is_floating_point() else v for k, v in b.items()} for b in batches]
    params = [p for p in model.parameters() if p.requires_grad]
    with sdpa_kernel(SDPBackend.MATH):  # differentiable twice
        losses = torch.cat([loss_fn(model, b).reshape(-1) for b in batches])
        grads = torch.autograd.grad(losses.mean(), params, create_graph=True)
        slope = sum((g * d.double()).sum() for g, d in zip(grads, direction))
        hd = torch.autograd.grad(slope, params)
    curvature = sum((h * d.double()).sum() for h, d in zip(hd, direction))
    return float(curvature), float(slope.detach()), [g.detach() for g in grads]


def _previous(model, scale=0.05, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return {n: p.detach() + scale * torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in model.named_parameters()}


def _unit(tensors):
    norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))
    return [t / norm for t in tensors], norm


def _dense_top_fisher_vector(model, batches, loss_fn):
    """v_1 of the empirical Fisher F = G^T G / N, its largest entry positive, and F's top eigenvalue.

    G [N, P] stacks the per-sample gradients (one backward per sample, float64); v_1 is G's
    first right singular vector and lambda_1 = s_1^2 / N (a thin SVD: F itself is P x P).
    """
    from tests.oracles import oracle_per_sample_grads, param_slices

    _, grads = oracle_per_sample_grads(model, batches, loss_fn)
    _, singular, vh = torch.linalg.svd(grads, full_matrices=False)
    v = vh[0]
    v = v * torch.sign(v[v.abs().argmax()])
    vector = [v[sl].view(p.shape) for (_, sl), p in zip(param_slices(model).items(), model.parameters())]
    return vector, float(singular[0]) ** 2 / grads.shape[0]


def _handed_fisher(model, vector):
    """What ``fisher`` hands on at a save: ``{"fisher": {"top_eigenvector": {param name: tensor}}}``."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return SaveResults(outputs={"fisher": {"top_eigenvector": dict(zip(names, vector))}})


#: (model, scheme, step): each scheme at a step inside its asymptotic regime on each model (the
#: tiny GPT-2's gradient direction has |f''' / f''| ~ 140, so the schemes that see odd
#: derivatives need smaller steps there: ``"one_sided"`` was 1.3e-4 off at 1e-3).
ORACLE_CASES = [
    (mlp_case, "two_sided", 0.01), (mlp_case, "one_sided", 0.01), (mlp_case, "central", 0.01),
    (bert_case, "two_sided", 3e-3), (bert_case, "one_sided", 3e-3), (bert_case, "central", 0.01),
    (gpt2_case, "two_sided", 1e-3), (gpt2_case, "one_sided", 3e-4), (gpt2_case, "central", 1e-3),
]  # fmt: skip


@pytest.mark.parametrize(("build", "scheme", "step"), ORACLE_CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_curvature_and_slope_match_double_backward_along_all_three_directions(build, scheme, step):
    model, batches, loss_fn = build(torch.float64)
    model.eval()
    previous = _previous(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    history = History(previous=(CheckpointState(7, previous, "fp-prev"),))
    fisher, _ = _dense_top_fisher_vector(model, batches, loss_fn)
    metric = DirectionalSharpness(directions=["update", "gradient", "fisher"], step=step, scheme=scheme)
    with sdpa_kernel(SDPBackend.MATH):
        result = metric.compute(model, batches, loss_fn, history=history, results=_handed_fisher(model, fisher))
    assert result.status == "ok", result.meta.get("partial_reason")
    assert result.meta["skipped_directions"] == {} and result.meta["scheme"] == scheme
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # restored bit for bit
    update, update_norm = _unit([p.detach() - previous[n] for n, p in model.named_parameters()])
    lam_u, slope_u, grads = exact_directional(model, batches, loss_fn, update)
    gradient, grad_norm = _unit(grads)
    lam_g, slope_g, _ = exact_directional(model, batches, loss_fn, gradient)
    lam_f, slope_f, _ = exact_directional(model, batches, loss_fn, fisher)
    s = result.scalars
    for name, lam, slope in (("update", lam_u, slope_u), ("gradient", lam_g, slope_g), ("fisher", lam_f, slope_f)):
        assert s[f"{name}/curvature"] == pytest.approx(lam, rel=1e-4), name
        assert abs(s[f"{name}/curvature"] - lam) <= s[f"{name}/curvature_error"] + 1e-12, name  # the error estimate holds
        assert s[f"{name}/slope"] == pytest.approx(slope, rel=1e-9, abs=1e-12), name  # exact: g . d from the backward
        assert f"{name}/slope_error" not in s
        if lam > 0:
            assert s[f"{name}/critical_lr"] == pytest.approx(2.0 / lam, rel=1e-4), name
        else:
            assert f"{name}/critical_lr" not in s
    assert s["gradient/slope"] == pytest.approx(grad_norm, rel=1e-9)
    assert s["update/norm"] == pytest.approx(update_norm, rel=1e-12) and "fisher/norm" not in s
    assert result.meta["slope_method"].startswith("exact")
    with torch.no_grad():
        loss = torch.cat([loss_fn(model, b).reshape(-1).double() for b in batches]).mean().item()
    assert s["loss"] == pytest.approx(loss, rel=1e-12)
    np.testing.assert_allclose(result.arrays["steps"], [step, 2 * step, 4 * step])
    evaluated = list(GRID) if scheme == "central" else [0.0, *OFFSETS[scheme]]
    for name in ("update", "gradient", "fisher"):
        losses = result.arrays[f"{name}/losses"]
        assert losses.shape == (7,) and losses[3] == pytest.approx(loss, rel=1e-12)
        assert [t for t, v in zip(GRID, losses) if not np.isnan(v)] == sorted(evaluated)  # NaN where f is not evaluated
        assert result.arrays[f"{name}/second_differences"].shape == (3,)
    forwards = {"two_sided": 10, "one_sided": 10, "central": 20}[scheme]
    assert result.meta["probe_forwards"] == forwards
    n_chunks = len(batches)
    assert result.meta["forward_passes"] == (forwards - 1) * n_chunks and result.meta["backward_passes"] == n_chunks


class _PassCounter:
    """Counts the probe passes a metric makes: forwards by a forward pre-hook (samples / probe samples), backwards by a gradient hook on one parameter."""

    def __init__(self, model, n_samples, n_chunks):
        self.samples = 0
        self.backward_chunks = 0
        self._n, self._chunks = n_samples, n_chunks
        self._handles = [model.register_forward_pre_hook(self._forward, with_kwargs=True),
                         next(model.parameters()).register_hook(self._backward)]  # fmt: skip

    def _forward(self, _module, args, kwargs):
        x = kwargs.get("input_ids", args[0] if args else None)
        self.samples += int(x.shape[0])

    def _backward(self, grad):
        self.backward_chunks += 1

    @property
    def forwards(self):
        return self.samples / self._n

    @property
    def backwards(self):
        return self.backward_chunks / self._chunks

    def remove(self):
        for handle in self._handles:
            handle.remove()


@pytest.mark.parametrize(("scheme", "forwards", "backwards"), [("two_sided", 10, 1), ("one_sided", 10, 1), ("central", 20, 1)])
def test_three_directions_cost_what_the_scheme_declares_counted_by_hooks(scheme, forwards, backwards):
    """The default measures all three directions in 10 probe forwards (the backward's included) and 1 backward."""
    from uma_callbacks.metrics.time_cost import UnitCosts

    model, batches, loss_fn = gpt2_case()
    history = History(previous=(CheckpointState(1, _previous(model), "p"),))
    gen = torch.Generator().manual_seed(5)
    fisher, _ = _unit([torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in model.parameters()])  # any unit vector
    metric = DirectionalSharpness(directions=["update", "gradient", "fisher"], step=1e-3, scheme=scheme)
    counter = _PassCounter(model, n_samples=sum(len(b["input_ids"]) for b in batches), n_chunks=len(batches))
    try:
        result = metric.compute(model, batches, loss_fn, history=history, results=_handed_fisher(model, fisher))
    finally:
        counter.remove()
    assert result.meta["skipped_directions"] == {}
    assert (counter.forwards, counter.backwards) == (forwards, backwards)
    assert metric.probe_passes() == (forwards, backwards) and result.meta["probe_forwards"] == forwards
    units = UnitCosts(forward=1.0, backward=3.0, hvp=6.0, n_batches=1)  # the planner's view: a backward is a forward+backward
    assert metric.time_cost(units) == (forwards - backwards) * 1.0 + backwards * 3.0
    if scheme != "central":  # the 12 probe forwards for optimizer_state + weight_spectra + sharpness (the others: none)
        assert forwards <= 12


def test_central_alone_along_the_update_needs_no_backward_and_the_default_does_one():
    model, batches, loss_fn = mlp_case()
    history = History(previous=(CheckpointState(1, _previous(model), "p"),))
    n = sum(len(b["x"]) for b in batches)
    for scheme, forwards, backwards in (("central", 7, 0), ("two_sided", 4, 1)):
        metric = DirectionalSharpness(directions=["update"], scheme=scheme)
        counter = _PassCounter(model, n_samples=n, n_chunks=len(batches))
        try:
            metric.compute(model, batches, loss_fn, history=history)
        finally:
            counter.remove()
        assert (counter.forwards, counter.backwards) == (forwards, backwards) == metric.probe_passes()
        assert dict(metric.memory_modes())["default"].forward_only is (backwards == 0)


def test_fisher_direction_through_the_suite_is_the_top_fisher_eigenvector_and_matches_double_backward(monkeypatch):
    """Direction (c) through the suite: fisher runs first (listed after) and hands on v_1; f''(0) = v_1^T H v_1 to 1e-4."""
    from uma_callbacks.engine.probe import Probe
    from uma_callbacks.engine.suite import MetricSuite
    from uma_callbacks.metrics import FisherInformation

    for build, step, spectrum in ((mlp_case, 0.01, "gram"), (gpt2_case, 1e-3, "lanczos")):
        if spectrum == "lanczos":  # the spectrum by Lanczos (the Gram path is for one process, up to GRAM_MAX_ROWS rows)
            monkeypatch.setattr("uma_callbacks.metrics.fisher.GRAM_MAX_ROWS", 0)
        model, batches, loss_fn = build(torch.float64)
        model.eval()
        dense, top = _dense_top_fisher_vector(model, batches, loss_fn)
        fisher = FisherInformation(top_k=2, lanczos_tol=1e-10, max_matvecs=60)
        handed = fisher.compute(model, batches, loss_fn, results=SaveResults(requested=frozenset({"top_eigenvector"})))
        assert handed.meta["spectrum_method"] == spectrum
        assert handed.arrays["top_eigenvalues"][0] == pytest.approx(top, rel=1e-9)
        vector = handed.provided["top_eigenvector"]
        assert list(vector) == [n for n, p in model.named_parameters() if p.requires_grad]
        for got, want in zip(vector.values(), dense):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-7)  # the same unit vector, the same sign
        with sdpa_kernel(SDPBackend.MATH):
            suite = MetricSuite(metrics=[DirectionalSharpness(directions=["gradient", "fisher"], step=step), fisher],
                                loss_fn=loss_fn, draw_figures=False)  # fmt: skip
            records = suite.run(model, Probe(batches), step=1)
        assert [r.metric for r in records] == ["fisher", "sharpness"]
        sharp = records[1]
        assert sharp.status == "ok", (sharp.error, sharp.meta.get("partial_reason"))
        assert sharp.meta["skipped_directions"] == {} and "results_missing" not in sharp.meta
        lam, slope, _ = exact_directional(model, batches, loss_fn, dense)
        s = sharp.scalars
        assert s["fisher/curvature"] == pytest.approx(lam, rel=1e-4)
        assert abs(s["fisher/curvature"] - lam) <= s["fisher/curvature_error"] + 1e-12
        assert s["fisher/slope"] == pytest.approx(slope, rel=1e-6, abs=1e-12)
        assert s["fisher/critical_lr"] == pytest.approx(2.0 / lam, rel=1e-4) and "fisher/norm" not in s
        assert sharp.meta["probe_forwards"] == 7 and sharp.meta["forward_passes"] == 6 * len(batches)


def test_fisher_direction_is_skipped_with_the_reason_when_fisher_fails_or_is_absent():
    from uma_callbacks.engine.probe import Probe
    from uma_callbacks.engine.suite import MetricSuite
    from uma_callbacks.metrics import FisherInformation

    model, batches, loss_fn = mlp_case()
    broken = FisherInformation()
    one = [{k: v[:1] for k, v in batches[0].items()}]  # a probe of one sample: fisher needs two, and fails
    for metrics, needle in (([DirectionalSharpness(directions=["gradient", "fisher"])], "fisher is not among"),
                            ([broken, DirectionalSharpness(directions=["gradient", "fisher"])], "fisher error at this save")):  # fmt: skip
        records = MetricSuite(metrics=metrics, loss_fn=loss_fn, draw_figures=False).run(model, Probe(one), step=1)
        sharp = records[-1]
        assert sharp.status == "ok" and "gradient/curvature" in sharp.scalars and "fisher/curvature" not in sharp.scalars
        assert needle in sharp.meta["skipped_directions"]["fisher"], sharp.meta["skipped_directions"]
        assert needle in sharp.meta["results_missing"]["fisher"]


def _adamw_trained(build, steps=3, weight_decay=0.1):
    """``build``'s float64 case after ``steps`` AdamW steps (decoupled weight decay); ``(model, batches, loss_fn, optimizer)``."""
    model, batches, loss_fn = build(torch.float64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay)
    for t in range(steps):
        opt.zero_grad()
        loss_fn(model, batches[t % len(batches)]).mean().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval(), batches, loss_fn, opt


def _hand_pending(model, opt):
    """``{name: -lr m_hat / (sqrt(v_hat) + eps) - lr wd theta}``, the step AdamW takes from its moments as they are."""
    out = {}
    for name, p in model.named_parameters():
        group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
        state, (b1, b2), lr = opt.state[p], group["betas"], group["lr"]
        t = float(state["step"])
        m_hat, v_hat = state["exp_avg"] / (1 - b1**t), state["exp_avg_sq"] / (1 - b2**t)
        out[name] = -lr * m_hat / (v_hat.sqrt() + group["eps"]) - lr * group["weight_decay"] * p.detach()
    return out


def _suite_sharpness(model, batches, loss_fn, metrics, **run):
    from uma_callbacks.engine.probe import Probe
    from uma_callbacks.engine.suite import MetricSuite

    journal = run.pop("journal", None)
    with sdpa_kernel(SDPBackend.MATH):
        records = MetricSuite(metrics=metrics, journal=journal, loss_fn=loss_fn, draw_figures=False).run(
            model, Probe(batches), **{"step": 3, **run}
        )
    return records


@pytest.mark.parametrize(("build", "step"), [(mlp_case, 0.01), (gpt2_case, 1e-3)], ids=["mlp", "gpt2"])
def test_first_save_measures_the_update_along_the_pending_adamw_step_and_matches_double_backward(build, step):
    """No previous checkpoint: direction (a) is the step optimizer_state hands on; f''(0) = d^T H d along it to 1e-4."""
    from uma_callbacks.core.optimizer_state import from_optimizer
    from uma_callbacks.metrics import OptimizerState

    model, batches, loss_fn, opt = _adamw_trained(build)
    direction, norm = _unit(list(_hand_pending(model, opt).values()))
    metrics = [DirectionalSharpness(step=step), OptimizerState()]  # listed first, run after its provider
    records = _suite_sharpness(model, batches, loss_fn, metrics, optimizer=from_optimizer(opt, model))
    assert [r.metric for r in records] == ["optimizer_state", "sharpness"]
    sharp = records[1]
    assert sharp.status == "ok", (sharp.error, sharp.meta.get("partial_reason"))
    assert sharp.meta["skipped_directions"] == {} and "results_missing" not in sharp.meta
    assert sharp.meta["update_source"] == "optimizer_pending_step"
    lam, slope, _ = exact_directional(model, batches, loss_fn, direction)
    s = sharp.scalars
    assert s["update/curvature"] == pytest.approx(lam, rel=1e-4)
    assert abs(s["update/curvature"] - lam) <= s["update/curvature_error"] + 1e-12
    assert s["update/slope"] == pytest.approx(slope, rel=1e-9, abs=1e-12)
    assert s["update/norm"] == pytest.approx(norm, rel=1e-12)
    assert s["update/slope"] < 0  # a step of Adam goes downhill on this probe


def test_first_save_without_a_pending_step_skips_the_update_with_both_reasons():
    from uma_callbacks.core.optimizer_state import from_optimizer
    from uma_callbacks.metrics import OptimizerState

    model, batches, loss_fn, opt = _adamw_trained(mlp_case)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    cases = (
        ([DirectionalSharpness()], from_optimizer(opt, model), "optimizer_state is not among this save's metrics"),
        ([DirectionalSharpness(), OptimizerState()], None, "optimizer_state skipped at this save: no optimizer state was given"),
        ([DirectionalSharpness(), OptimizerState()], from_optimizer(sgd, model), "the optimizer is SGD, not Adam"),
    )
    for metrics, optimizer, needle in cases:
        sharp = _suite_sharpness(model, batches, loss_fn, metrics, optimizer=optimizer)[-1]
        reason = sharp.meta["skipped_directions"]["update"]
        assert reason.startswith("no previous checkpoint yet, and no pending optimizer step at this save: "), reason
        assert needle in reason and needle in sharp.meta["results_missing"]["optimizer_state"]
        assert "update_source" not in sharp.meta and "gradient/curvature" in sharp.scalars
        assert not any(k.startswith("update/") for k in sharp.scalars)


def test_with_a_previous_checkpoint_the_history_wins_over_the_pending_step():
    model, batches, loss_fn, opt = _adamw_trained(mlp_case)
    pending = _hand_pending(model, opt)
    handed = SaveResults(outputs={"optimizer_state": {"pending_update": pending}})
    previous = _previous(model)
    history = History(previous=(CheckpointState(2, previous, "fp-prev"),))
    metric = DirectionalSharpness(directions=["update"])
    with_history = metric.compute(model, batches, loss_fn, history=history, results=handed)
    alone = metric.compute(model, batches, loss_fn, results=handed)
    assert with_history.meta["update_source"] == "history" and alone.meta["update_source"] == "optimizer_pending_step"
    _, delta_norm = _unit([p.detach() - previous[n] for n, p in model.named_parameters()])
    assert with_history.scalars["update/norm"] == pytest.approx(delta_norm, rel=1e-12)
    assert alone.scalars["update/norm"] == pytest.approx(_unit(list(pending.values()))[1], rel=1e-12)


def test_a_pending_step_without_a_parameter_moves_it_not_and_one_of_another_shape_is_not_used():
    model, batches, loss_fn, opt = _adamw_trained(mlp_case)
    pending = _hand_pending(model, opt)
    names = list(pending)
    metric = DirectionalSharpness(directions=["update"])
    partial = {n: t for n, t in pending.items() if n != names[0]}  # a parameter the optimizer holds no state for
    got = metric.compute(model, batches, loss_fn, results=SaveResults(outputs={"optimizer_state": {"pending_update": partial}}))
    direction, norm = _unit([torch.zeros_like(pending[n]) if n == names[0] else pending[n] for n in names])
    lam, _, _ = exact_directional(model, batches, loss_fn, direction)
    assert got.scalars["update/norm"] == pytest.approx(norm, rel=1e-12)
    assert got.scalars["update/curvature"] == pytest.approx(lam, rel=1e-4)
    bad = {**pending, names[0]: pending[names[0]].reshape(-1)}
    with pytest.raises(MetricSkipped, match=rf"pending optimizer step handed on does not fit.*mis-shaped \['{names[0]}'\]"):
        metric.compute(model, batches, loss_fn, results=SaveResults(outputs={"optimizer_state": {"pending_update": bad}}))
    zero = {n: torch.zeros_like(t) for n, t in pending.items()}
    with pytest.raises(MetricSkipped, match="pending optimizer step is zero"):
        metric.compute(model, batches, loss_fn, results=SaveResults(outputs={"optimizer_state": {"pending_update": zero}}))


def test_cache_keys_tell_the_update_sources_apart(tmp_path):
    """Same weights: with the pending step, without it, with another optimizer state, with a previous checkpoint: four keys."""
    from uma_callbacks.core.optimizer_state import OptimizerSnapshot, from_optimizer
    from uma_callbacks.engine.history import CheckpointHistory
    from uma_callbacks.engine.journal import Journal
    from uma_callbacks.metrics import OptimizerState

    model, batches, loss_fn, opt = _adamw_trained(mlp_case)
    journal = Journal(tmp_path)
    metrics = [DirectionalSharpness(), OptimizerState()]
    state = from_optimizer(opt, model)
    doubled = OptimizerSnapshot(kind="AdamW", groups=state.groups, params={
        n: {k: v * 2.0 if k == "exp_avg" else v.clone() for k, v in s.items()} for n, s in state.params.items()
    })  # fmt: skip
    history = CheckpointHistory(metrics)
    earlier = copy.deepcopy(model)
    with torch.no_grad():
        for p in earlier.parameters():
            p.add_(0.01)
    history.push(earlier, 2, "weights-before")
    runs = [{"optimizer": state}, {}, {"optimizer": state}, {"optimizer": doubled}, {"optimizer": state, "history": history}]
    sharp = []
    for i, run in enumerate(runs):
        records = _suite_sharpness(model, batches, loss_fn, metrics, step=3 + i, checkpoint="weights-A", journal=journal, **run)
        sharp.append(records[-1])
    assert [r.metric for r in sharp] == ["sharpness"] * 5
    assert [r.status for r in sharp] == ["ok", "ok", "cached", "ok", "ok"]  # the third: the first's key, optimizer_state cached
    assert [r.meta.get("update_source") for r in sharp] == [
        "optimizer_pending_step", None, "optimizer_pending_step", "optimizer_pending_step", "history",
    ]  # fmt: skip
    assert len({r.cache_key for r in sharp}) == 4 and sharp[2].cache_key == sharp[0].cache_key
    norms = [r.scalars.get("update/norm") for r in sharp]
    assert norms[1] is None and norms[2] == norms[0] and norms[3] != pytest.approx(norms[0])
    assert norms[4] == pytest.approx(0.01 * math.sqrt(sum(p.numel() for p in model.parameters())), rel=1e-9)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_float32_stays_within_its_error_estimate(scheme):
    model, batches, loss_fn = mlp_case(torch.float32)
    result = DirectionalSharpness(directions=["gradient"], step=0.05, scheme=scheme).compute(model, batches, loss_fn)
    _, _, grads = exact_directional(model, batches, loss_fn, [torch.zeros_like(p) for p in model.parameters()])
    lam, _, _ = exact_directional(model, batches, loss_fn, _unit(grads)[0])
    assert result.status == "ok"
    assert abs(result.scalars["gradient/curvature"] - lam) <= result.scalars["gradient/curvature_error"]
    assert result.scalars["gradient/curvature"] == pytest.approx(lam, rel=1e-3)
    assert result.meta["rounding_noise"] > 0 and result.meta["slope_noise"] > 0


@pytest.mark.parametrize(("scheme", "step"), [("central", 0.1), ("one_sided", 0.03)])
def test_steps_too_large_for_the_curvature_give_a_partial_result_naming_the_direction(scheme, step):
    model, batches, loss_fn = gpt2_case()
    with sdpa_kernel(SDPBackend.MATH):
        result = DirectionalSharpness(directions=["gradient"], step=step, scheme=scheme).compute(model, batches, loss_fn)
    assert result.status == "partial" and "gradient" in result.meta["partial_reason"]
    assert "gradient/curvature" in result.scalars  # values kept


def test_two_sided_has_no_partial_check_and_its_error_estimate_grows_with_the_step():
    """Three values fit the extrapolation exactly, so no check on them; a step too large shows in the error estimate."""
    model, batches, loss_fn = gpt2_case()
    _, _, grads = exact_directional(model, batches, loss_fn, [torch.zeros_like(p) for p in model.parameters()])
    lam, _, _ = exact_directional(model, batches, loss_fn, _unit(grads)[0])
    errors = []
    for step in (1e-3, 3e-2):
        with sdpa_kernel(SDPBackend.MATH):
            result = DirectionalSharpness(directions=["gradient"], step=step).compute(model, batches, loss_fn)
        assert result.status == "ok" and "partial_reason" not in result.meta
        errors.append(result.scalars["gradient/curvature_error"] / abs(lam))
    assert errors[0] < 1e-3 and errors[1] > 0.1  # 5e-4 and 0.15 of f'' (the value itself is 0.47 off there)


def test_first_checkpoint_skips_the_update_and_fisher_with_their_reasons():
    model, batches, loss_fn = mlp_case()
    result = DirectionalSharpness(directions=["update", "gradient", "fisher"]).compute(model, batches, loss_fn)
    skipped = result.meta["skipped_directions"]
    assert set(skipped) == {"update", "fisher"}
    assert skipped["update"].startswith("no previous checkpoint yet, and no pending optimizer step at this save: optimizer_state did not run")
    assert skipped["fisher"].startswith("no top Fisher eigenvector at this save: fisher did not run before this metric")
    assert "gradient/curvature" in result.scalars and not any(k.startswith("update/") for k in result.scalars)
    assert result.meta["probe_forwards"] == 4 and result.meta["forward_passes"] == 3 * len(batches)
    with pytest.raises(MetricSkipped, match="no direction"):
        DirectionalSharpness(directions=["update"]).compute(model, batches, loss_fn)


def test_central_update_alone_takes_the_slope_from_differences():
    model, batches, loss_fn = mlp_case()
    previous = _previous(model)
    history = History(previous=(CheckpointState(1, previous, "p"),))
    metric = DirectionalSharpness(directions=["update"], step=0.01, scheme="central")
    result = metric.compute(model, batches, loss_fn, history=history)
    update, _ = _unit([p.detach() - previous[n] for n, p in model.named_parameters()])
    _, slope, _ = exact_directional(model, batches, loss_fn, update)
    assert result.meta["backward_passes"] == 0 and result.meta["forward_passes"] == 7 * len(batches)
    assert result.meta["slope_method"].startswith("central")
    assert result.scalars["update/slope"] == pytest.approx(slope, rel=1e-8)
    assert result.scalars["update/slope_error"] < 1e-8


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"directions": ["hessian"]}, "directions"), ({"directions": []}, "directions"), ({"directions": "update"}, "directions"),
     ({"directions": ["update", "update"]}, "directions"), ({"step": 0.0}, "step"), ({"n_batches": 0}, "n_batches"),
     ({"scheme": "forward"}, "scheme")],
)  # fmt: skip
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DirectionalSharpness(**kwargs)


def test_scheme_error_lists_the_schemes_and_the_scheme_is_in_the_cache_key():
    from uma_callbacks.engine.suite import _key_config

    expected = r"DirectionalSharpness\.scheme must be one of \('two_sided', 'one_sided', 'central'\); got 'forward'"
    with pytest.raises(ValueError, match=expected):
        DirectionalSharpness(scheme="forward")
    keys = [_key_config(DirectionalSharpness(scheme=scheme))[0] for scheme in SCHEMES]
    assert [k["scheme"] for k in keys] == list(SCHEMES)  # the keys differ in the scheme alone
    assert all({**k, "scheme": None} == {**keys[0], "scheme": None} for k in keys)
    assert DirectionalSharpness().scheme == "two_sided"


def test_time_cost_counts_forwards_and_the_backward():
    from uma_callbacks.metrics.time_cost import UnitCosts

    units = UnitCosts(forward=1.0, backward=3.0, hvp=6.0, n_batches=4)
    assert METRICS["sharpness"] is DirectionalSharpness
    assert DirectionalSharpness().time_cost(units) == 6.0 + 3.0  # 1 + 3 x 2 forwards, one of them with its backward
    assert DirectionalSharpness(directions=["update", "fisher"]).time_cost(units) == 6.0 + 3.0
    assert DirectionalSharpness(scheme="central").time_cost(units) == 13.0 + 3.0
    assert DirectionalSharpness(directions=["update", "fisher"], scheme="central").time_cost(units) == 13.0
    scaled, changes = DirectionalSharpness().scaled_to(5.0, units)
    assert changes == {"n_batches": [None, 2]} and scaled.time_cost(units) <= 5.0


def test_figure_is_drawn_from_the_result_alone(tmp_path):
    pytest.importorskip("matplotlib")
    from uma_callbacks.plots import draw_result

    model, batches, loss_fn = mlp_case()
    result = DirectionalSharpness(directions=["gradient"]).compute(model, batches, loss_fn)
    paths = draw_result(result, tmp_path)
    assert [p.name for p in paths] == ["sharpness.png"] and paths[0].stat().st_size > 0


@pytest.mark.slow
def test_trainer_run_logs_sharpness_weight_spectra_and_optimizer_state_to_mlflow(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from tests.trainer_cases import run_trainer, tiny_lm_dataset
    from uma_callbacks import UMACallback

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store(tmp_path))
    cb = UMACallback(
        metrics=["weight_spectra", DirectionalSharpness(step=0.01), "optimizer_state"], probe=tiny_lm_dataset(n=8, seed=1),
        probe_size=8, trackers=["mlflow"], draw_figures=False,
    )  # fmt: skip
    run_trainer(tmp_path / "out", callbacks=[cb], max_steps=4, save_steps=2)
    assert [(r.step, r.metric) for r in cb.records] == [
        (2, "weight_spectra"),
        (2, "optimizer_state"),  # sharpness's provider runs before it
        (2, "sharpness"),
        (4, "weight_spectra"),
        (4, "optimizer_state"),
        (4, "sharpness"),
    ]
    assert all(r.status in ("ok", "partial") for r in cb.records), [(r.metric, r.status, r.error) for r in cb.records]
    sink = cb.sinks[0]
    client = MlflowClient(sink.tracking_uri)
    run_id = sink.run_id()
    history = {k: client.get_metric_history(run_id, f"uma/{k}") for k in (
        "weight_spectra/stable_rank_mean", "weight_spectra/layers/model.layers.0.mlp.up_proj/spectral_norm",
        "sharpness/gradient/curvature", "sharpness/update/curvature", "sharpness/update/norm",
    )}  # fmt: skip
    assert [m.step for m in history["weight_spectra/stable_rank_mean"]] == [2, 4]
    assert [m.step for m in history["sharpness/gradient/curvature"]] == [2, 4]
    # the first save measures along the optimizer's pending step, the second along the update between the saves
    assert [m.step for m in history["sharpness/update/curvature"]] == [2, 4]
    sharp = {r.step: r for r in cb.records if r.metric == "sharpness"}
    assert {s: r.meta["update_source"] for s, r in sharp.items()} == {2: "optimizer_pending_step", 4: "history"}
    assert all(r.meta["skipped_directions"] == {} for r in sharp.values())
    live = {(r.step, r.metric): r.scalars for r in cb.records}
    # no weight decay (the Trainer's default): the pending step is -u, whose norm optimizer_state logs
    assert live[(2, "sharpness")]["update/norm"] == pytest.approx(live[(2, "optimizer_state")]["update_norm"], rel=1e-5)
    for key, points in history.items():
        metric, _, scalar = key.partition("/")
        for point in points:
            assert point.value == pytest.approx(live[(point.step, metric)][scalar], rel=1e-12), key
            assert math.isfinite(point.value)
    # the update between the saves is the one the trainer made: the weights moved
    assert history["sharpness/update/norm"][0].value > 0

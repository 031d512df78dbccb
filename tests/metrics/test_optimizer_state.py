"""OptimizerState against hand-computed Adam steps in float64; the state from a live Trainer, MLflow and optimizer.pt; the pending step it hands on."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

from tests.cases import mlp_case
from tests.mlflow_store import mlflow_store
from tests.trainer_cases import run_trainer, tiny_lm, tiny_lm_dataset
from uma_callbacks.core.optimizer_state import OptimizerSnapshot, from_optimizer, from_state_dict
from uma_callbacks.metrics import METRICS, OptimizerState
from uma_callbacks.metrics.base import MetricSkipped, module_of
from uma_callbacks.triggers.optimizer_file import candidate_orders, read_optimizer_state

LR, BETAS, EPS = 0.05, (0.8, 0.95), 1e-6


def _hand_adam(model, batches, loss_fn, steps, weight_decay, amsgrad):
    """``steps`` AdamW steps taken by torch and by hand (float64): the model, the optimizer, the hand update of the last step and its moments.

    Returns:
        ``(optimizer, {name: (theta before the last step, theta after it)}, {name: u}, {name: (m, v)})``.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=weight_decay, amsgrad=amsgrad)
    params = dict(model.named_parameters())
    m = {n: torch.zeros_like(p) for n, p in params.items()}
    v = {n: torch.zeros_like(p) for n, p in params.items()}
    vmax = {n: torch.zeros_like(p) for n, p in params.items()}
    for t in range(1, steps + 1):
        opt.zero_grad()
        loss_fn(model, batches[(t - 1) % len(batches)]).mean().backward()
        before = {n: p.detach().clone() for n, p in params.items()}
        update = {}
        for n, p in params.items():
            g = p.grad.detach()
            m[n] = BETAS[0] * m[n] + (1 - BETAS[0]) * g
            v[n] = BETAS[1] * v[n] + (1 - BETAS[1]) * g * g
            vmax[n] = torch.maximum(vmax[n], v[n])
            second = vmax[n] if amsgrad else v[n]
            m_hat, v_hat = m[n] / (1 - BETAS[0] ** t), second / (1 - BETAS[1] ** t)
            update[n] = LR * m_hat / (v_hat.sqrt() + EPS)
        opt.step()
    opt.zero_grad(set_to_none=True)
    moved = {n: (before[n], p.detach().clone()) for n, p in params.items()}
    return opt, moved, update, {n: (m[n], vmax[n] if amsgrad else v[n]) for n in params}


@pytest.mark.parametrize(("weight_decay", "amsgrad"), [(0.0, False), (0.1, False), (0.0, True)])
def test_update_is_the_step_adamw_took_by_hand_and_by_torch(weight_decay, amsgrad):
    model, batches, loss_fn = mlp_case(dtype=torch.float64)
    opt, moved, hand, moments = _hand_adam(model, batches, loss_fn, 3, weight_decay, amsgrad)
    result = OptimizerState(keep_update=True).compute(model, batches, loss_fn, optimizer_state=from_optimizer(opt, model))
    assert result.status == "ok" and set(result.tensors) == set(hand)
    sums: dict[str, dict[str, float]] = {}
    for name, u in result.tensors.items():
        before, after = moved[name]
        torch.testing.assert_close(u, hand[name], rtol=0, atol=1e-12)
        # AdamW: theta' = theta (1 - lr wd) - u; the metric's u is the Adam part of the step torch took
        torch.testing.assert_close(u, before * (1 - LR * weight_decay) - after, rtol=0, atol=1e-10)
        mod = sums.setdefault(module_of(name), {"u": 0.0, "w": 0.0, "m": 0.0, "v": 0.0, "mhat": 0.0})
        m, v = moments[name]
        mod["u"] += float((u**2).sum())
        mod["w"] += float((after**2).sum())
        mod["m"] += float((m**2).sum())
        mod["v"] += float((v**2).sum())
        mod["mhat"] += float(((m / (1 - BETAS[0] ** 3)) ** 2).sum())
    s = result.scalars
    for module, mod in sums.items():
        assert s[f"layers/{module}/update_norm"] == pytest.approx(math.sqrt(mod["u"]), rel=1e-12)
        assert s[f"layers/{module}/exp_avg_norm"] == pytest.approx(math.sqrt(mod["m"]), rel=1e-12)
        assert s[f"layers/{module}/exp_avg_sq_norm"] == pytest.approx(math.sqrt(mod["v"]), rel=1e-12)
        assert s[f"layers/{module}/update_ratio"] == pytest.approx(math.sqrt(mod["u"] / mod["w"]), rel=1e-12)
        assert s[f"layers/{module}/effective_lr"] == pytest.approx(math.sqrt(mod["u"] / mod["mhat"]), rel=1e-12)
    total_u = sum(x["u"] for x in sums.values())
    assert s["update_norm"] == pytest.approx(math.sqrt(total_u), rel=1e-12)
    assert s["update_ratio"] == pytest.approx(math.sqrt(total_u / sum(x["w"] for x in sums.values())), rel=1e-12)
    assert s["step"] == 3.0 and s["groups/0/lr"] == LR and s["groups/0/beta2"] == BETAS[1]
    assert s["groups/0/weight_decay"] == weight_decay and s["groups/0/eps"] == EPS


def test_first_step_update_is_lr_times_the_gradient_sign():
    """At t = 1, m_hat = g and v_hat = g^2: u = lr g / (|g| + eps), so ||u|| ~ lr sqrt(n) and effective_lr ~ lr sqrt(n) / ||g||."""
    model, batches, loss_fn = mlp_case(dtype=torch.float64)
    opt, _, _, moments = _hand_adam(model, batches, loss_fn, 1, 0.0, False)
    result = OptimizerState().compute(model, batches, loss_fn, optimizer_state=from_optimizer(opt, model))
    n = sum(p.numel() for p in model.parameters())
    g_norm = math.sqrt(sum(float(((m / (1 - BETAS[0])) ** 2).sum()) for m, _ in moments.values()))
    assert result.scalars["update_norm"] == pytest.approx(LR * math.sqrt(n), rel=1e-4)
    assert result.scalars["effective_lr"] == pytest.approx(LR * math.sqrt(n) / g_norm, rel=1e-4)


def test_without_state_or_with_another_optimizer_a_skip_names_why():
    model, batches, loss_fn = mlp_case(dtype=torch.float64)
    metric = OptimizerState()
    with pytest.raises(MetricSkipped, match="no optimizer state was given"):
        metric.compute(model, batches, loss_fn)
    with pytest.raises(MetricSkipped, match="checkpoint-4 holds no optimizer.pt"):
        metric.compute(
            model, batches, loss_fn, optimizer_state=OptimizerSnapshot.unavailable("checkpoint-4 holds no optimizer.pt")
        )
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn(model, batches[0]).mean().backward()
    sgd.step()
    model.zero_grad(set_to_none=True)
    with pytest.raises(MetricSkipped, match="the optimizer is SGD, not Adam"):
        metric.compute(model, batches, loss_fn, optimizer_state=from_optimizer(sgd, model))
    saved = from_state_dict(sgd.state_dict(), candidate_orders(model), {n: p.shape for n, p in model.named_parameters()}, "f")
    with pytest.raises(MetricSkipped, match=r"momentum_buffer"):
        metric.compute(model, batches, loss_fn, optimizer_state=saved)
    fresh = torch.optim.AdamW(model.parameters())
    with pytest.raises(MetricSkipped, match="no step taken"):
        metric.compute(model, batches, loss_fn, optimizer_state=from_optimizer(fresh, model))


def test_a_state_of_other_shapes_is_an_error_naming_the_first_mismatch(tmp_path):
    model = tiny_lm()
    other = tiny_lm(vocab=60)  # the embedding and the head differ
    opt = torch.optim.AdamW(other.parameters())
    batch = {"input_ids": torch.randint(1, 50, (2, 5)), "labels": torch.randint(1, 50, (2, 5))}
    other(**batch).loss.backward()
    opt.step()
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    torch.save(opt.state_dict(), folder / "optimizer.bin")
    state = read_optimizer_state(folder, model)
    assert state.error and "model.embed_tokens.weight" in state.error and "[60, 16]" in state.error
    with pytest.raises(ValueError, match=r"does not match 'model.embed_tokens.weight' \(shape \[50, 16\]\)"):
        OptimizerState().compute(model, [batch], optimizer_state=state)
    live = from_optimizer(opt, model)  # the live optimizer of another model: none of its parameters is this model's
    assert live.missing
    (folder / "optimizer.bin").write_bytes(b"not a torch file")
    assert "could not be read with weights_only=True" in read_optimizer_state(folder, model).error
    (folder / "optimizer.bin").unlink()
    assert read_optimizer_state(folder, model).missing == "checkpoint-1 holds no optimizer.pt or optimizer.bin"


def test_same_weights_with_another_optimizer_state_is_not_read_from_cache(tmp_path):
    from uma_callbacks.engine.journal import Journal
    from uma_callbacks.engine.probe import Probe
    from uma_callbacks.engine.suite import MetricSuite

    model, batches, loss_fn = mlp_case(dtype=torch.float64)
    suite = MetricSuite(metrics=[OptimizerState()], journal=Journal(tmp_path), loss_fn=loss_fn, draw_figures=False)
    opt, _, _, _ = _hand_adam(model, batches, loss_fn, 2, 0.0, False)
    first = from_optimizer(opt, model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    records = [suite.run(model, Probe(batches), step=2, checkpoint="weights-A", optimizer=first)[0]]
    copied = {n: {k: v.clone() for k, v in s.items()} for n, s in first.params.items()}
    records.append(suite.run(model, Probe(batches), step=3, checkpoint="weights-A", optimizer=first)[0])
    for s in copied.values():  # the same weights, another state: its moments doubled
        s["exp_avg"].mul_(2.0)
    second = OptimizerSnapshot(kind="AdamW", params=copied, groups=first.groups)
    records.append(suite.run(model, Probe(batches), step=4, checkpoint="weights-A", optimizer=second)[0])
    assert [r.status for r in records] == ["ok", "cached", "ok"]
    assert records[2].scalars["update_norm"] != pytest.approx(records[0].scalars["update_norm"])
    assert records[2].scalars["exp_avg_norm"] == pytest.approx(2 * records[0].scalars["exp_avg_norm"], rel=1e-12)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    none = suite.run(model, Probe(batches), step=5, checkpoint="weights-A")[0]
    assert none.status == "skipped" and "no optimizer state" in none.error["message"]


def test_registered_without_probe_or_gradient_and_drawn(tmp_path):
    pytest.importorskip("matplotlib")
    from uma_callbacks.plots import draw_result

    assert METRICS["optimizer_state"] is OptimizerState and OptimizerState.needs_optimizer
    assert OptimizerState.needs_probe is False and OptimizerState.needs_grad is False
    with pytest.raises(ValueError, match="OptimizerState.keep_update"):
        OptimizerState(keep_update=1)
    model, batches, loss_fn = mlp_case(dtype=torch.float64)
    opt, _, _, _ = _hand_adam(model, batches, loss_fn, 2, 0.0, False)
    result = OptimizerState().compute(model, batches, loss_fn, optimizer_state=from_optimizer(opt, model))
    paths = draw_result(result, tmp_path)
    assert [p.name for p in paths] == ["optimizer_state.png"] and paths[0].stat().st_size > 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Qwen2 Trainer run (weight decay: two param groups; saves at 2 and 4) logging optimizer_state to MLflow."""
    pytest.importorskip("mlflow")
    from uma_callbacks import UMACallback

    root = tmp_path_factory.mktemp("optimizer_state")
    uri = mlflow_store(root)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        cb = UMACallback(metrics=["optimizer_state"], probe=tiny_lm_dataset(n=4, seed=1), probe_size=4, trackers=["mlflow"])
        run_trainer(root / "run", callbacks=[cb], max_steps=4, save_steps=2, weight_decay=0.1, lr_scheduler_type="constant")
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    return {"run": root / "run", "uri": uri, "run_id": cb.sinks[0].run_id(), "cb": cb}


def test_trainer_run_logs_the_optimizer_state_to_mlflow(trained):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(trained["uri"])
    run_id = trained["run_id"]
    live = {r.step: r for r in trained["cb"].records if r.metric == "optimizer_state"}
    assert sorted(live) == [2, 4] and all(r.status == "ok" for r in live.values())
    for key in ("update_ratio", "effective_lr", "exp_avg_norm", "layers/model.layers.0.mlp.up_proj/update_ratio",
                "groups/0/weight_decay", "groups/1/weight_decay", "step"):  # fmt: skip
        history = client.get_metric_history(run_id, f"uma/optimizer_state/{key}")
        assert [m.step for m in history] == [2, 4], key
        for m in history:
            assert m.value == pytest.approx(live[m.step].scalars[key], rel=1e-6), key
    decay = {m.step: m.value for m in client.get_metric_history(run_id, "uma/optimizer_state/groups/0/weight_decay")}
    steps = {m.step: m.value for m in client.get_metric_history(run_id, "uma/optimizer_state/step")}
    assert decay == {2: 0.1, 4: 0.1} and steps == {2: 2.0, 4: 4.0}  # the Trainer's decay group first; Adam's own step count
    assert client.get_metric_history(run_id, "uma/optimizer_state/groups/1/weight_decay")[0].value == 0.0


def test_trainer_optimizer_pt_loads_weights_only_and_the_backfill_equals_the_live_values(trained, tmp_path):
    from uma_callbacks.triggers.backfill import backfill

    saved = torch.load(trained["run"] / "checkpoint-4" / "optimizer.pt", weights_only=True)
    assert len(saved["param_groups"]) == 2 and saved["param_groups"][0]["weight_decay"] == 0.1
    summary = backfill(trained["run"], metrics=["optimizer_state"], trajectory=False, use_cache=False,
                       output_dir=tmp_path / "fresh", draw_figures=False, progress=False, trackers=[])  # fmt: skip
    assert summary.computed == 2, summary.describe()
    live = {r.step: r for r in trained["cb"].records if r.metric == "optimizer_state"}
    for record in summary.records:
        assert record.status == "ok" and record.meta["optimizer_source"] == f"checkpoint-{record.step}/optimizer.pt"
        ref = live[record.step].scalars
        assert set(record.scalars) == set(ref) and len(ref) > 20
        for key, value in ref.items():
            assert record.scalars[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key


def test_pieces_add_up_to_the_whole(monkeypatch):
    """Large tensors are read in float64 pieces: pieces of 7 entries give the same values as one piece."""
    import uma_callbacks.metrics.optimizer_state as module

    model, batches, loss_fn = mlp_case(dtype=torch.float32)
    opt, _, _, _ = _hand_adam(model, batches, loss_fn, 2, 0.0, True)
    whole = OptimizerState(keep_update=True).compute(model, batches, loss_fn, optimizer_state=from_optimizer(opt, model))
    monkeypatch.setattr(module, "PIECE", 7)
    cut = OptimizerState(keep_update=True).compute(model, batches, loss_fn, optimizer_state=from_optimizer(opt, model))
    assert set(cut.scalars) == set(whole.scalars)
    for key, value in whole.scalars.items():
        assert cut.scalars[key] == pytest.approx(value, rel=1e-12), key
    assert all(torch.equal(cut.tensors[n], whole.tensors[n]) for n in whole.tensors)


def _spearman_case():
    """The MLP after 3 AdamW steps on batches whose first input is 0: ties in both sqrt(v_hat) and the Fisher diagonal."""
    from tests.oracles import oracle_per_sample_grads, param_slices

    model, batches, loss_fn = mlp_case(dtype=torch.float64)
    for batch in batches:
        batch["x"][:, 0] = 0.0  # fc1.weight[:, 0] gets no gradient: zero moments and zero Fisher entries
    opt, _, _, moments = _hand_adam(model, batches, loss_fn, 3, 0.0, False)
    _, grads = oracle_per_sample_grads(model, batches, loss_fn)
    diag = (grads**2).mean(0)
    slices = param_slices(model)
    root_vhat = {n: (v / (1 - BETAS[1] ** 3)).sqrt().reshape(-1) for n, (_, v) in moments.items()}
    return model, batches, loss_fn, opt, root_vhat, {n: diag[sl] for n, sl in slices.items()}


def test_fisher_spearman_matches_scipy_over_all_entries_and_per_module():
    """With fisher at the same save: Spearman's rho of sqrt(v_hat) and the dense Fisher diagonal, as scipy computes it."""
    stats = pytest.importorskip("scipy.stats")
    from uma_callbacks.engine.probe import Probe
    from uma_callbacks.engine.suite import MetricSuite
    from uma_callbacks.metrics import FisherInformation

    model, batches, loss_fn, opt, root_vhat, diag = _spearman_case()
    suite = MetricSuite(metrics=[OptimizerState(), FisherInformation(top_k=None)], loss_fn=loss_fn, draw_figures=False)
    records = suite.run(model, Probe(batches), step=3, optimizer=from_optimizer(opt, model))
    assert [r.metric for r in records] == ["fisher", "optimizer_state"]
    record = records[1]
    assert record.status == "ok" and record.meta["skipped"] == {} and record.meta["fisher_spearman_sampled"] is False
    x = torch.cat(list(root_vhat.values()))
    y = torch.cat(list(diag.values()))
    assert int((y == 0).sum()) == 5 and int((x == 0).sum()) == 5  # the ties are there
    want = stats.spearmanr(x.numpy(), y.numpy()).statistic
    assert record.scalars["fisher_spearman"] == pytest.approx(want, rel=1e-12)
    assert record.meta["fisher_spearman_entries"] == x.numel()
    for module in ("fc1", "fc2", "head"):
        names = [n for n in root_vhat if module_of(n) == module]
        rho = stats.spearmanr(torch.cat([root_vhat[n] for n in names]).numpy(), torch.cat([diag[n] for n in names]).numpy())
        assert record.scalars[f"layers/{module}/fisher_spearman"] == pytest.approx(rho.statistic, rel=1e-12), module


def test_fisher_spearman_above_the_entry_cap_is_taken_over_the_seeded_sample(monkeypatch):
    stats = pytest.importorskip("scipy.stats")
    import uma_callbacks.metrics.optimizer_state as module
    from uma_callbacks.metrics.base import SaveResults

    model, batches, loss_fn, opt, root_vhat, diag = _spearman_case()
    monkeypatch.setattr(module, "SPEARMAN_ENTRIES", 20)  # the whole (54) sampled
    monkeypatch.setattr(module, "SPEARMAN_MODULE_ENTRIES", 20)  # fc1 (20 entries) exact, fc2 (24) sampled
    results = SaveResults(outputs={"fisher": {"diagonal": {n: d.view(p.shape) for (n, p), d in zip(model.named_parameters(), diag.values())}}})
    result = OptimizerState().compute(model, batches, loss_fn, optimizer_state=from_optimizer(opt, model), results=results)
    assert result.meta["fisher_spearman_sampled"] is True
    x, y = torch.cat(list(root_vhat.values())), torch.cat(list(diag.values()))
    index = torch.unique(torch.randint(x.numel(), (20,), generator=torch.Generator().manual_seed(module.SPEARMAN_SEED)))
    assert result.meta["fisher_spearman_entries"] == index.numel() <= 20
    want = stats.spearmanr(x[index].numpy(), y[index].numpy()).statistic
    assert result.scalars["fisher_spearman"] == pytest.approx(want, rel=1e-12)
    fc1 = [n for n in root_vhat if module_of(n) == "fc1"]
    exact = stats.spearmanr(torch.cat([root_vhat[n] for n in fc1]).numpy(), torch.cat([diag[n] for n in fc1]).numpy())
    assert result.scalars["layers/fc1/fisher_spearman"] == pytest.approx(exact.statistic, rel=1e-12)
    fc2 = [n for n in root_vhat if module_of(n) == "fc2"]
    x2, y2 = torch.cat([root_vhat[n] for n in fc2]), torch.cat([diag[n] for n in fc2])
    index2 = torch.unique(torch.randint(x2.numel(), (20,), generator=torch.Generator().manual_seed(module.SPEARMAN_SEED)))
    sampled = stats.spearmanr(x2[index2].numpy(), y2[index2].numpy()).statistic
    assert result.scalars["layers/fc2/fisher_spearman"] == pytest.approx(sampled, rel=1e-12)


def test_without_fisher_at_the_save_the_spearman_key_is_skipped_with_the_reason():
    from uma_callbacks.engine.probe import Probe
    from uma_callbacks.engine.suite import MetricSuite
    from uma_callbacks.metrics import FisherInformation

    model, batches, loss_fn = mlp_case(dtype=torch.float64)
    opt, _, _, _ = _hand_adam(model, batches, loss_fn, 2, 0.0, False)
    one = [{k: v[:1] for k, v in batches[0].items()}]  # fisher needs two samples: it fails on this probe
    for metrics, needle in (([OptimizerState()], "fisher is not among this save's metrics"),
                            ([FisherInformation(), OptimizerState()], "fisher error at this save")):  # fmt: skip
        suite = MetricSuite(metrics=metrics, loss_fn=loss_fn, draw_figures=False)
        record = suite.run(model, Probe(one), step=2, optimizer=from_optimizer(opt, model))[-1]
        assert record.status == "ok" and "update_norm" in record.scalars
        assert not any("fisher_spearman" in k for k in record.scalars)
        assert needle in record.meta["skipped"]["fisher_spearman"]


# ---------------------------------------------------------------------- the pending step handed on
def _rewound_step(model, opt):
    """``{name: theta_after - theta_before}`` of one real ``opt.step()`` on a copy whose state is rewound one step, with a zero gradient.

    The copy's state is m / beta1, v / beta2, t - 1 (``max_exp_avg_sq`` kept): the zero-gradient
    step brings it back to m, v, t, so the step it takes is the one from the moments as they are.
    """
    model, opt = copy.deepcopy((model, opt))  # one memo: the copy's optimizer steps the copy's parameters
    for group in opt.param_groups:
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            state = opt.state[p]
            state["exp_avg"].div_(beta1)
            state["exp_avg_sq"].div_(beta2)
            state["step"].sub_(1)
            p.grad = torch.zeros_like(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}


def _asked_pending():
    from uma_callbacks.metrics.base import SaveResults

    return SaveResults(requested=frozenset({"pending_update"}))


@pytest.mark.parametrize(("weight_decay", "amsgrad"), [(0.0, False), (0.1, False), (0.1, True)])
def test_pending_update_is_the_step_adamw_takes_from_its_moments_by_hand_and_by_torch(weight_decay, amsgrad):
    """Delta theta = -lr m_hat / (sqrt(v_hat) + eps) - lr wd theta: by hand, and opt.step() on a rewound copy, to 1e-10."""
    model, batches, loss_fn = mlp_case(dtype=torch.float64)
    opt, moved, _, moments = _hand_adam(model, batches, loss_fn, 3, weight_decay, amsgrad)
    result = OptimizerState().compute(model, batches, loss_fn, optimizer_state=from_optimizer(opt, model), results=_asked_pending())
    pending = result.provided["pending_update"]
    assert list(pending) == [n for n, _ in model.named_parameters()] and result.tensors == {}
    torch_step = _rewound_step(model, opt)
    for name, p in model.named_parameters():
        m, v = moments[name]
        hand = -LR * (m / (1 - BETAS[0] ** 3)) / ((v / (1 - BETAS[1] ** 3)).sqrt() + EPS) - LR * weight_decay * p.detach()
        assert pending[name].dtype == p.dtype and pending[name].shape == p.shape
        torch.testing.assert_close(pending[name], hand, rtol=0, atol=1e-12)
        torch.testing.assert_close(pending[name], torch_step[name], rtol=0, atol=1e-10)
        if weight_decay == 0.0:  # right after a step, the pending step is the step just taken
            before, after = moved[name]
            torch.testing.assert_close(pending[name], after - before, rtol=0, atol=1e-10)
    assert "not_provided" not in result.meta


def test_pending_update_leaves_adams_coupled_decay_to_the_gradient_and_is_formed_only_when_asked():
    """Adam's L2 decay enters through the next gradient: its pending step is -u alone; nothing is formed unless asked."""
    from uma_callbacks.metrics.optimizer_state import adam_update, decoupled_decay

    model, batches, loss_fn = mlp_case(dtype=torch.float64)
    opt = torch.optim.Adam(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=0.1)
    for batch in batches:
        opt.zero_grad()
        loss_fn(model, batch).mean().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    state = from_optimizer(opt, model)
    assert state.kind == "Adam" and decoupled_decay(state.kind, state.groups[0]) == 0.0
    pending = OptimizerState().compute(model, batches, loss_fn, optimizer_state=state, results=_asked_pending())
    for name, p in model.named_parameters():
        s = opt.state[p]
        u = adam_update(s["exp_avg"], s["exp_avg_sq"], float(s["step"]), LR, BETAS, EPS)
        torch.testing.assert_close(pending.provided["pending_update"][name], -u, rtol=0, atol=1e-15)
    plain = OptimizerState().compute(model, batches, loss_fn, optimizer_state=state)
    assert plain.provided == {} and plain.scalars == pending.scalars


def test_pending_update_is_planned_as_one_parameter_copy_when_asked():
    from uma_callbacks.metrics.optimizer_state import PIECE

    cost = dict(OptimizerState().memory_modes())["default"]
    plain = cost.bytes_needed(4000, 0, 1, n_params=1000)
    asked = cost.bytes_needed(4000, 0, 1, n_params=1000, requested=frozenset({"pending_update"}))
    assert asked - plain == 4000 + 8 * PIECE  # the parameters' size in their dtype, and one float64 piece forming it


def test_backfill_of_one_checkpoint_hands_the_pending_step_of_its_optimizer_pt_to_sharpness(trained, tmp_path):
    """No earlier checkpoint in the backfill: sharpness's last update is the step the saved AdamW state would take."""
    from transformers import AutoModelForCausalLM

    from uma_callbacks.metrics import DirectionalSharpness
    from uma_callbacks.triggers.backfill import backfill

    folder = trained["run"] / "checkpoint-2"
    summary = backfill([folder], metrics=["optimizer_state", DirectionalSharpness(directions=["update"])],
                       probe=tiny_lm_dataset(n=4, seed=1), probe_size=4, trajectory=False, use_cache=False,
                       output_dir=tmp_path / "one", draw_figures=False, progress=False, trackers=[])  # fmt: skip
    records = {r.metric: r for r in summary.records}
    assert summary.computed == 2 and list(records) == ["optimizer_state", "sharpness"], summary.describe()
    sharp = records["sharpness"]
    assert sharp.status == "ok" and sharp.meta["update_source"] == "optimizer_pending_step", (sharp.error, sharp.meta)
    assert math.isfinite(sharp.scalars["update/curvature"]) and sharp.meta["skipped_directions"] == {}
    model = AutoModelForCausalLM.from_pretrained(folder)
    state = read_optimizer_state(folder, model)
    assert [g["weight_decay"] for g in state.groups] == [0.1, 0.0]  # the Trainer's decay group, then the rest
    square = 0.0
    for name, p in model.named_parameters():
        s, group = state.params[name], state.group_of(name)
        t, (b1, b2), lr = float(s["step"]), group["betas"], group["lr"]
        m_hat, v_hat = s["exp_avg"].double() / (1 - b1**t), s["exp_avg_sq"].double() / (1 - b2**t)
        step = -lr * m_hat / (v_hat.sqrt() + group["eps"]) - lr * group["weight_decay"] * p.detach().double()
        square += float((step**2).sum())
    assert sharp.scalars["update/norm"] == pytest.approx(math.sqrt(square), rel=1e-5)

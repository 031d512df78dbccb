"""InformationTheory against float64 brute force: dense n x n eigvalsh, hand-made PIDs, and dit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.cases import mlp_case, qwen2_case
from uma_callbacks.core.activations import sample_hashes, token_keys
from uma_callbacks.metrics.information import (
    InformationTheory,
    class_entropy,
    class_joint_entropy,
    discretise_states,
    joint_counts,
    joint_entropy,
    matrix_entropy,
    pid_williams_beer,
    renyi_entropy,
    target_classes,
)

REL = 1e-6


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _dense_entropy(k: torch.Tensor, alpha: float) -> float:
    """S_alpha of K / tr K from the dense n x n eigvalsh, bits."""
    lam = torch.linalg.eigvalsh(k / k.trace()).clamp_min(0)
    lam = lam[lam > 1e-300]
    if alpha == 1.0:
        return float(-(lam * torch.log2(lam)).sum())
    return float(torch.log2((lam**alpha).sum()) / (1 - alpha))


def _unit_gram(x):
    u = x / x.norm(dim=1, keepdim=True)
    return u @ u.T


@pytest.mark.parametrize("alpha", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("n,d", [(25, 4), (5, 12)])
def test_matrix_entropy_and_joint_entropy_match_dense_eigvalsh(alpha, n, d):
    x, z = _randn(n, d), _randn(n, 3, seed=1) + 0.5
    assert matrix_entropy(x, alpha) == pytest.approx(_dense_entropy(_unit_gram(x), alpha), rel=REL)
    joint, side = joint_entropy(x, z, alpha)
    assert side == ("features" if d * 3 < n else "tokens")  # features: the Khatri-Rao rows, dx dz < n
    assert joint == pytest.approx(_dense_entropy(_unit_gram(x) * _unit_gram(z), alpha), rel=REL)


@pytest.mark.parametrize("alpha", [1.0, 3.0])
def test_entropy_with_the_one_hot_target_gram_matches_dense(alpha):
    x = _randn(30, 6)
    labels = torch.tensor([0, 1, 2, 2, 2, 5, 5, -1] * 3 + [7, 8, 9, 9, 9, 1])
    onehot = (labels[:, None] == labels[None, :]).double()
    assert class_joint_entropy(x, labels, alpha) == pytest.approx(_dense_entropy(_unit_gram(x) * onehot, alpha), rel=REL)
    assert class_entropy(labels, alpha) == pytest.approx(_dense_entropy(onehot, alpha), rel=REL)


def test_renyi_limits():
    lam = torch.tensor([0.5, 0.25, 0.25, 0.0], dtype=torch.float64)
    assert renyi_entropy(lam, 1.0) == pytest.approx(1.5)
    assert renyi_entropy(lam, 1.0 + 1e-7) == pytest.approx(1.5, rel=1e-6)
    assert renyi_entropy(lam, 2.0) == pytest.approx(-np.log2(0.375))


def _xor():
    p = np.zeros((2, 2, 2))
    for a in (0, 1):
        for b in (0, 1):
            p[a, b, a ^ b] = 0.25
    return p


def _copy_both():
    p = np.zeros((2, 2, 2))
    p[0, 0, 0] = p[1, 1, 1] = 0.5
    return p


def _unique_first():
    p = np.zeros((2, 2, 2))
    for a in (0, 1):
        for b in (0, 1):
            p[a, b, a] = 0.25
    return p


@pytest.mark.parametrize(
    "joint,expected",
    [
        (_xor(), {"redundancy": 0.0, "unique_x": 0.0, "unique_y": 0.0, "synergy": 1.0}),
        (_copy_both(), {"redundancy": 1.0, "unique_x": 0.0, "unique_y": 0.0, "synergy": 0.0}),
        (_unique_first(), {"redundancy": 0.0, "unique_x": 1.0, "unique_y": 0.0, "synergy": 0.0}),
    ],
    ids=["xor_synergy", "y_eq_x1_eq_x2_redundancy", "y_eq_x1_unique"],
)
def test_pid_hand_cases(joint, expected):
    got = pid_williams_beer(joint)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert got["mi_joint"] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("shape,seed", [((3, 2, 3), 0), ((4, 3, 5), 1)])
def test_pid_matches_dit_pid_wb(shape, seed):
    dit = pytest.importorskip("dit")
    from dit.pid import PID_WB

    p = np.random.default_rng(seed).random(shape)
    p[0, 0, :] = 0.0  # some empty cells
    p /= p.sum()
    outcomes = [o for o in np.ndindex(*shape) if p[o] > 0]
    pid = PID_WB(dit.Distribution(outcomes, [p[o] for o in outcomes]), [[0], [1]], [2])
    got = pid_williams_beer(p)
    assert got["redundancy"] == pytest.approx(pid.get_pi(((0,), (1,))), abs=1e-9)
    assert got["unique_x"] == pytest.approx(pid.get_pi(((0,),)), abs=1e-9)
    assert got["unique_y"] == pytest.approx(pid.get_pi(((1,),)), abs=1e-9)
    assert got["synergy"] == pytest.approx(pid.get_pi(((0, 1),)), abs=1e-9)


def _oracle(model, batches, seed):
    """All non-padding tokens in key order: (block states, embeddings, next ids, logits)."""
    outs, blocks, emb, nxt, logits, keys = {}, [[], []], [], [], [], []
    hs = [b.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o[0] if isinstance(o, tuple) else o))
          for i, b in enumerate(model.model.layers)]
    with torch.no_grad():
        for b in batches:
            mask = b["attention_mask"].bool()
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            for i in range(2):
                blocks[i].append(outs[i][mask])
            emb.append(model.model.embed_tokens(b["input_ids"])[mask])
            ids = b["input_ids"]
            for r in range(ids.shape[0]):
                valid = ids[r][mask[r]].tolist()
                nxt.append(torch.tensor(valid[1:] + [-1]))
            logits.append(out.logits[mask])
            positions = (mask.long().cumsum(1) - 1).clamp(min=0)
            keys.append(token_keys(sample_hashes(b, mask), positions, seed)[mask])
    for h in hs:
        h.remove()
    order = torch.argsort(torch.cat(keys))
    return [torch.cat(s)[order] for s in blocks], torch.cat(emb)[order], torch.cat(nxt)[order], torch.cat(logits)


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_every_scalar_on_a_tiny_qwen2_matches_brute_force(alpha):
    model, batches, loss_fn = qwen2_case(torch.float64)
    result = InformationTheory(alpha=alpha, max_tokens=10_000, seed=4).compute(model, batches, loss_fn)
    states, emb, nxt, logits = _oracle(model, batches, 4)
    n = emb.shape[0]
    onehot = (nxt[:, None] == nxt[None, :]).double()
    kb = _unit_gram(emb)
    s_b, s_y = _dense_entropy(kb, alpha), _dense_entropy(onehot, alpha)
    for i, x in enumerate(states):
        ka = _unit_gram(x)
        s_a = _dense_entropy(ka, alpha)
        assert result.scalars[f"layers/{i}/entropy"] == pytest.approx(s_a, rel=REL)
        assert result.scalars[f"layers/{i}/mi_input"] == pytest.approx(s_a + s_b - _dense_entropy(ka * kb, alpha), rel=REL)
        mi_t = s_a + s_y - _dense_entropy(ka * onehot, alpha)
        assert result.scalars[f"layers/{i}/mi_next_token"] == pytest.approx(mi_t, rel=REL)
        assert result.arrays["information_plane"][i, 1] == pytest.approx(mi_t, rel=REL)
    logp = torch.log_softmax(logits, -1)
    assert result.scalars["output_entropy"] == pytest.approx(float(-(logp.exp() * logp).sum(-1).mean()), rel=REL)
    # the PID of the same discretisation, and its parts sum to I(Y; X1, X2) counted directly
    a, b = discretise_states(states[0], 4, 4, 4), discretise_states(states[1], 4, 4, 5)
    y = target_classes(nxt, 4)
    expected = pid_williams_beer(joint_counts(a, b, y))
    for key, value in expected.items():
        assert result.scalars[f"pid/{key}"] == pytest.approx(value, rel=REL, abs=1e-12)
    p = joint_counts(a, b, y) / n
    pxy, py = p.reshape(-1, p.shape[2]), p.sum((0, 1))
    px = pxy.sum(1, keepdims=True)
    nz = pxy > 0
    mi = float((pxy[nz] * np.log2(pxy[nz] / (px * py[None])[nz])).sum())
    parts = sum(result.scalars[f"pid/{k}"] for k in ("redundancy", "unique_x", "unique_y", "synergy"))
    assert parts == pytest.approx(mi, rel=1e-9)
    assert result.meta["n_tokens_used"] == n and result.meta["eigen_side"] == ["features", "features"]
    assert result.meta["joint_input_side"] == ["tokens", "tokens"]  # 16 x 16 features > n


def test_mi_input_on_the_first_mi_tokens_of_the_sample_matches_dense():
    model, batches, loss_fn = qwen2_case(torch.float64)
    result = InformationTheory(max_tokens=10_000, mi_tokens=12, seed=4).compute(model, batches, loss_fn)
    states, emb, _, _ = _oracle(model, batches, 4)
    kb = _unit_gram(emb[:12])
    for i, x in enumerate(states):
        ka = _unit_gram(x[:12])
        expected = _dense_entropy(ka, 1.0) + _dense_entropy(kb, 1.0) - _dense_entropy(ka * kb, 1.0)
        assert result.scalars[f"layers/{i}/mi_input"] == pytest.approx(expected, rel=REL)
        assert result.scalars[f"layers/{i}/entropy"] == pytest.approx(_dense_entropy(_unit_gram(x), 1.0), rel=REL)
    assert result.meta["n_tokens_mi_input"] == 12 and result.meta["n_tokens_used"] == emb.shape[0]


def test_token_side_is_used_when_there_are_fewer_tokens_than_features():
    model, batches, loss_fn = qwen2_case(torch.float64)
    result = InformationTheory(max_tokens=9).compute(model, batches, loss_fn)
    assert result.meta["eigen_side"] == ["tokens", "tokens"] and result.meta["n_tokens_used"] == 9


def test_a_plain_network_without_input_ids_gets_entropies_and_mi_input_only():
    model, batches, loss_fn = mlp_case()
    result = InformationTheory(max_tokens=50, modules=["fc1", "fc2"]).compute(model, batches, loss_fn)
    assert {"layers/0/entropy", "layers/1/mi_input", "output_entropy"} <= set(result.scalars)
    assert not any(k.startswith("pid/") or k.endswith("mi_next_token") for k in result.scalars)
    assert "next tokens" in result.meta["target"]


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"alpha": float("inf")}, "alpha"),
        ({"max_tokens": 1}, "max_tokens"),
        ({"mi_tokens": 1}, "mi_tokens"),
        ({"pid_bins": 1}, "pid_bins"),
        ({"pid_components": 0}, "pid_components"),
        ({"pid_layers": (0,)}, "pid_layers"),
        ({"modules": ["a", 3]}, "modules"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"InformationTheory\.{field}"):
        InformationTheory(**kwargs)


def test_bad_module_pid_layer_and_an_all_padding_probe_fail_at_compute():
    model, batches, loss_fn = qwen2_case(torch.float64)
    with pytest.raises(ValueError, match=r"InformationTheory\.modules names modules the model does not have"):
        InformationTheory(modules=["nope"]).compute(model, batches, loss_fn)
    with pytest.raises(ValueError, match=r"InformationTheory\.pid_layers index 5 is out of range"):
        InformationTheory(pid_layers=(0, 5)).compute(model, batches, loss_fn)
    empty = [dict(b, attention_mask=torch.zeros_like(b["attention_mask"])) for b in batches]
    with pytest.raises(ValueError, match="no non-padding tokens"):
        InformationTheory().compute(model, empty, loss_fn)


def test_mi_label_of_a_classifier_matches_the_dense_brute_force():
    """mi_label = S(A) + S(B) - S(A o B), B_jk = [label of j's sample = label of k's], by dense eigvalsh."""
    from tests.cases import bert_case

    model, batches, loss_fn = bert_case(torch.float64)
    result = InformationTheory(max_tokens=10_000, seed=2).compute(model, batches, loss_fn)
    outs, states, labels, keys = {}, [], [], []
    hooks = [layer.register_forward_hook(lambda m, a, o: outs.__setitem__(0, o[0] if isinstance(o, tuple) else o))
             for layer in model.bert.encoder.layer]  # fmt: skip
    with torch.no_grad():
        for b in batches:
            mask = b["attention_mask"].bool()
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            states.append(outs[0][mask])
            labels.append(b["labels"][:, None].expand(mask.shape)[mask])  # each token: its sample's class
            positions = (mask.long().cumsum(1) - 1).clamp(min=0)
            keys.append(token_keys(sample_hashes(b, mask), positions, 2)[mask])
    for h in hooks:
        h.remove()
    order = torch.argsort(torch.cat(keys))
    x, y = torch.cat(states)[order], torch.cat(labels)[order]
    onehot = (y[:, None] == y[None, :]).double()
    ka = _unit_gram(x)
    expected = _dense_entropy(ka, 1.0) + _dense_entropy(onehot, 1.0) - _dense_entropy(ka * onehot, 1.0)
    assert result.meta["n_tokens_used"] == x.shape[0] == 31
    assert result.scalars["layers/0/mi_label"] == pytest.approx(expected, rel=REL)
    assert 0.0 < expected <= _dense_entropy(onehot, 1.0) + 1e-9  # at most H(label) bits
    assert "layers/0/mi_next_token" in result.scalars and "label" not in result.meta


def test_a_language_model_probe_has_no_mi_label_and_says_why():
    model, batches, loss_fn = qwen2_case(torch.float64)
    result = InformationTheory(max_tokens=20).compute(model, batches, loss_fn)
    assert not any(k.endswith("mi_label") for k in result.scalars)
    assert "class labels" in result.meta["label"] and "layers/0/mi_next_token" in result.scalars

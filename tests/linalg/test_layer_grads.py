"""Per-layer hooks against a float64 brute force (one backward per sample), layer type by layer type."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.graph import get_gradient_edge

from tests.cases import TINY_CASES, bert_case
from tests.metrics.test_fisher import oracle_fisher
from tests.metrics.test_gradient_flow import oracle_gradient_flow
from tests.oracles import oracle_per_sample_grads, param_slices
from uma_callbacks.core.losses import hf_per_sample_loss
from uma_callbacks.core.model_state import eager_attention
from uma_callbacks.linalg import layer_grads
from uma_callbacks.linalg.layer_grads import hook_plan, layer_gradient_sums, layer_gradients, layer_rule
from uma_callbacks.linalg.layers import factors
from uma_callbacks.metrics import FisherInformation, GradientFlow


# ------------------------------------------------------------------ tiny models, one per layer type
class SeqLinear(torch.nn.Module):
    """Linear on [B, T1, T2, d] inputs (two sequence dims), wide enough for ghost norms."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 12)
        self.fc2 = torch.nn.Linear(12, 2, bias=False)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def seq_case():
    torch.manual_seed(1)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 2, 3, 6, generator=gen, dtype=torch.float64)
    y = torch.randn(4, 2, 3, 2, generator=gen, dtype=torch.float64)
    return SeqLinear().double(), [{"x": x, "y": y}], lambda m, b: ((m(b["x"]) - b["y"]) ** 2).sum((1, 2, 3))


class TiedLM(torch.nn.Module):
    """Embedding with padding_idx=0, LayerNorm, RMSNorm (Qwen2's), Conv1D, head tied to the embedding."""

    def __init__(self, vocab: int = 11, hidden: int = 8) -> None:
        super().__init__()
        from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
        from transformers.pytorch_utils import Conv1D

        self.embed = torch.nn.Embedding(vocab, hidden, padding_idx=0)
        self.ln = torch.nn.LayerNorm(hidden)
        self.conv = Conv1D(hidden, hidden)
        self.rms = Qwen2RMSNorm(hidden)
        self.head = torch.nn.Linear(hidden, vocab, bias=False)
        self.head.weight = self.embed.weight
        with torch.no_grad():
            for p in (self.ln.weight, self.ln.bias, self.rms.weight, self.conv.bias):
                p.normal_(1.0, 0.3)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + torch.tanh(self.conv(self.ln(h)))
        return self.head(self.rms(h))


def tied_loss(model, batch):
    """Mean token cross-entropy of the next token, pads (id 0) masked in the loss."""
    ids = batch["ids"]
    logits = model(ids)[:, :-1]
    target = ids[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    mask = (target != 0).to(ce.dtype)
    return (ce * mask).sum(1) / mask.sum(1)


def tied_case():
    torch.manual_seed(2)
    ids = torch.tensor([[3, 5, 2, 7, 0, 0], [4, 4, 9, 1, 10, 0], [2, 8, 8, 6, 5, 3], [7, 1, 0, 0, 0, 0]])
    return TiedLM().double(), [{"ids": ids[:2]}, {"ids": ids[2:]}], tied_loss


class Scale(torch.nn.Module):
    """A custom layer with no rule: y = x * w (falls back to vmap)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.w


class Reused(torch.nn.Module):
    """One block used twice (nn.Sequential(blk, blk)) and a custom layer."""

    def __init__(self) -> None:
        super().__init__()
        blk = torch.nn.Sequential(torch.nn.Linear(5, 5), torch.nn.Tanh())
        self.body = torch.nn.Sequential(blk, blk)
        self.scale = Scale(5)
        self.head = torch.nn.Linear(5, 1)

    def forward(self, x):
        return self.head(self.scale(self.body(x))).squeeze(-1)


def reused_case():
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(6, generator=gen, dtype=torch.float64)
    return Reused().double(), [{"x": x[:3], "y": y[:3]}, {"x": x[3:], "y": y[3:]}], lambda m, b: (m(b["x"]) - b["y"]) ** 2


def gpt2_case():
    """A tiny GPT-2 from config (Conv1D, LayerNorm, tied wte/lm_head, wpe) on right-padded batches."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(4)
    config = GPT2Config(vocab_size=30, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).double()
    gen = torch.Generator().manual_seed(4)
    batches = []
    for lengths in ([7, 5, 3], [7, 6, 2]):
        ids = torch.randint(1, 30, (3, 7), generator=gen)
        mask = torch.tensor([[1] * n + [0] * (7 - n) for n in lengths])
        batches.append({"input_ids": ids * mask, "attention_mask": mask, "labels": (ids * mask).masked_fill(mask == 0, -100)})
    return model, batches, hf_per_sample_loss


class _StopGate(torch.autograd.Function):
    """``gate * h`` whose backward gives the gate no gradient (``None``): the gate's Linear
    output requires grad, yet its gradient is undefined."""

    generate_vmap_rule = True

    @staticmethod
    def forward(gate, h):
        return gate * h

    @staticmethod
    def setup_context(ctx, inputs, output):  # the functorch-compatible form (vmap runs it too)
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (gate,) = ctx.saved_tensors
        return None, grad * gate


class TwoBranch(torch.nn.Module):
    """Two inputs through separate layers (no path between them in the graph), a learned
    query through its own Linear, a Linear whose output the loss does not use, and a gate
    Linear whose output gradient is undefined (a custom Function returns None for it)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(3, 4)
        self.b = torch.nn.Linear(2, 4)
        self.gate = torch.nn.Linear(4, 4)
        self.query = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 4))
        self.q = torch.nn.Linear(4, 4, bias=False)
        self.unused = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x1, x2):
        h = torch.tanh(self.a(x1)) * torch.tanh(self.b(x2))
        h = _StopGate.apply(self.gate(h), h)
        q = self.q(self.query.expand(x1.shape[0], 4))  # a bare parameter (no rule): vmap
        self.unused(h)
        return self.head(h + q).squeeze(-1)


def two_branch_case():
    torch.manual_seed(5)
    gen = torch.Generator().manual_seed(5)
    x1, x2 = torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randn(5, 2, generator=gen, dtype=torch.float64)
    y = torch.randn(5, generator=gen, dtype=torch.float64)
    batches = [{"x1": x1[:3], "x2": x2[:3], "y": y[:3]}, {"x1": x1[3:], "x2": x2[3:], "y": y[3:]}]
    return TwoBranch().double(), batches, lambda m, b: (m(b["x1"], b["x2"]) - b["y"]) ** 2


class InPlace(torch.nn.Module):
    """A Linear whose output the model scales in place (its hooks would see the gradient of
    the scaled tensor): that Linear goes to vmap, the others keep their hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 4)
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x):
        h = self.fc(x)
        h.mul_(torch.linspace(0.5, 2.0, 4, dtype=h.dtype))
        return self.head(torch.tanh(h)).squeeze(-1)


def in_place_case():
    torch.manual_seed(6)
    gen = torch.Generator().manual_seed(6)
    x, y = torch.randn(4, 3, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64)
    return InPlace().double(), [{"x": x[:2], "y": y[:2]}, {"x": x[2:], "y": y[2:]}], lambda m, b: (m(b["x"]) - b["y"]) ** 2


CASES = {
    "mlp": TINY_CASES[0].build,
    "output_scaled_in_place": in_place_case,
    "two_branches_and_unused_output": two_branch_case,
    "linear_4d": seq_case,
    "tied_embedding_norms_conv1d": tied_case,
    "reused_block_and_custom_layer": reused_case,
    "qwen2_ragged": TINY_CASES[1].build,
    "bert_padding_masks": bert_case,
    "gpt2": gpt2_case,
}
_ORACLES: dict = {}


def _oracle(name):
    if name not in _ORACLES:
        model, batches, loss_fn = CASES[name]()
        with eager_attention(model):
            _ORACLES[name] = oracle_per_sample_grads(model, batches, loss_fn)
    return _ORACLES[name]


@pytest.mark.parametrize("ghost", ["auto", "always", "never"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_every_reduction_matches_brute_force(name, ghost, monkeypatch):
    monkeypatch.setattr(factors, "GHOST", ghost)
    model, batches, loss_fn = CASES[name]()
    names, G = _oracle(name)
    slices = param_slices(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    plan = hook_plan(model, params)
    start = 0
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(G.shape[1], generator=gen, dtype=torch.float64)
    reps = []
    with eager_attention(model):
        for batch in batches:
            rep = layer_gradients(model, loss_fn, batch, params, plan)
            g = G[start : start + rep.n]
            start += rep.n
            diag, norms, sums, gram = rep.reduce(want_diag=True, want_sum=True, want_gram=True)
            _, ghost_norms, ghost_sums, _ = rep.reduce(want_diag=False, want_sum=True)
            _, lone_norms, _, lone_gram = rep.reduce(want_diag=False, want_gram=True)
            scale = float(g.square().sum(1).max())
            for i, n_ in enumerate(names):
                gp = g[:, slices[n_]]
                # entries that are 0 in exact arithmetic (BERT's key bias) hold rounding noise
                tol = {"rtol": 1e-6, "atol": 1e-12 * float(g.abs().max())}
                torch.testing.assert_close(diag[n_].reshape(-1), gp.square().sum(0), rtol=1e-6, atol=1e-12 * scale, msg=n_)
                torch.testing.assert_close(sums[n_].reshape(-1), gp.sum(0), **tol, msg=n_)
                torch.testing.assert_close(ghost_sums[n_].reshape(-1), gp.sum(0), **tol, msg=n_)
                for got in (norms, ghost_norms, lone_norms):
                    torch.testing.assert_close(got[:, i], gp.square().sum(1), rtol=1e-6, atol=1e-12 * scale, msg=n_)
            for got in (gram, lone_gram):
                torch.testing.assert_close(got, g @ g.T, rtol=1e-6, atol=1e-12 * scale)
            parts = {n_: v[slices[n_]].view(params[n_].shape) for n_ in names}
            torch.testing.assert_close(rep.dot(parts), g @ v, rtol=1e-6, atol=1e-10 * scale)
            u = torch.randn(rep.n, generator=gen, dtype=torch.float64)
            ws = rep.weighted_sum(u)
            for n_ in names:
                torch.testing.assert_close(ws[n_].reshape(-1), u @ g[:, slices[n_]], rtol=1e-6, atol=1e-10 * scale, msg=n_)
            reps.append((rep, g))
            _check_sums_during_backward(model, loss_fn, batch, params, plan, g, names, slices, scale)
    (a, ga), (b, gb) = reps[0], reps[-1]
    torch.testing.assert_close(a.cross_gram(b), ga @ gb.T, rtol=1e-6, atol=1e-12 * float(G.square().sum(1).max()))


def _check_sums_during_backward(model, loss_fn, batch, params, plan, g, names, slices, scale):
    """``layer_gradient_sums`` (reduced during the backward) gives the same as brute force,
    handing each parameter to ``consume`` exactly once, or keeping it."""
    got = layer_gradient_sums(model, loss_fn, batch, params, plan, want_diag=True, want_sum=True, want_gram=True)
    consumed: dict = {}

    def consume(name, d, s):
        assert name not in consumed, name
        consumed[name] = (d, s)

    streamed = layer_gradient_sums(model, loss_fn, batch, params, plan, want_diag=True, want_sum=True, consume=consume)
    assert set(consumed) == set(names) and streamed.diag == {} and streamed.grad_sum == {}
    tol = {"rtol": 1e-6, "atol": 1e-12 * float(g.abs().max())}
    for i, n_ in enumerate(names):
        gp = g[:, slices[n_]]
        for diag, sums in ((got.diag[n_], got.grad_sum[n_]), consumed[n_]):
            torch.testing.assert_close(diag.reshape(-1), gp.square().sum(0), rtol=1e-6, atol=1e-12 * scale, msg=n_)
            torch.testing.assert_close(sums.reshape(-1), gp.sum(0), **tol, msg=n_)
        for norms in (got.sq_norms, streamed.sq_norms):
            torch.testing.assert_close(norms[:, i], gp.square().sum(1), rtol=1e-6, atol=1e-12 * scale, msg=n_)
    torch.testing.assert_close(got.gram, g @ g.T, rtol=1e-6, atol=1e-12 * scale)


def test_anchor_outputs_reach_every_recorded_output():
    """The backward is asked for the first layer's output and for each output with no path
    to an earlier one (a second input's layer, a learned query's layer), not for the rest."""
    model, batches, loss_fn = two_branch_case()
    params = dict(model.named_parameters())
    plan = hook_plan(model, params)
    edges = {}
    rec = layer_grads._record_forward(
        model, loss_fn, batches[0], params, plan, 3, on_output=lambda slot, y: edges.__setitem__(slot, get_gradient_edge(y))
    )
    by_node = {edges[slot].node: plan.modules[index][0] for slot, index, _, _ in rec.usable}
    anchors = layer_grads._anchor_edges([edges[slot] for slot, _, _, _ in rec.usable])
    assert [by_node[edge.node] for edge in anchors] == ["a", "b", "q"]
    assert plan.leftover == ["query"]


def test_use_check_follows_the_loss_of_each_computation():
    """A second computation on the same model, with a loss that uses ``fc.weight`` outside
    ``fc``, checks again: its gradient is then that of the whole loss (vmap), not of the
    in-layer part the hooks see."""

    class OneLayer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x)

    torch.manual_seed(0)
    model, x = OneLayer().double(), torch.randn(4, 3, dtype=torch.float64)
    inside = lambda m, b: m(b).square().sum(-1)  # noqa: E731
    outside = lambda m, b: (m(b) + b @ m.fc.weight).square().sum(-1)  # noqa: E731
    want = oracle_gradient_flow(model, [x], outside)
    GradientFlow().compute(model, [x], inside)
    got = GradientFlow().compute(model, [x], outside)
    assert got.meta["vmap_params"] == {"fc.weight": "used outside its layers' forward"}
    assert got.scalars["params/fc.weight/norm"] == pytest.approx(want["params/fc.weight/norm"], rel=1e-9)


def test_rules_and_fallbacks():
    model, batches, loss_fn = in_place_case()  # fc's output scaled in place after the call
    params = dict(model.named_parameters())
    # reduced in the backward: the hook registered at the call sees the call's own output
    assert layer_gradient_sums(model, loss_fn, batches[0], params, hook_plan(model, params)).vmapped == []
    # captured after the forward: the output's gradient would be the scaled tensor's, so vmap
    rep = layer_gradients(model, loss_fn, batches[0], params, plan := hook_plan(model, params))
    assert rep.vmapped == ["fc.weight", "fc.bias"]
    assert plan.reasons["fc.weight"] == "a call of 'fc' had its input or output modified in place"
    model, batches, loss_fn = reused_case()
    params = dict(model.named_parameters())
    plan = hook_plan(model, params)
    assert plan.leftover == ["scale.w"] and plan.reasons["scale.w"] == "no per-layer rule"
    rep = layer_gradients(model, loss_fn, batches[0], params, plan)
    assert rep.vmapped == ["scale.w"]
    tied = TiedLM()
    rules = {n: layer_rule(m) for n, m in tied.named_modules() if n}
    assert rules == {"embed": "embedding", "ln": "layernorm", "conv": "conv1d", "rms": "rmsnorm", "head": "linear"}
    assert [n for n, _ in tied.named_parameters()].count("embed.weight") == 1  # tied: one name

    class MyLinear(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    assert layer_rule(MyLinear(2, 2)) is None
    assert layer_rule(torch.nn.Embedding(4, 2, max_norm=1.0)) is None


def test_padding_tokens_contribute_nothing():
    """Changing the ids under padding (mask 0, labels -100) changes no per-sample gradient."""
    model, batches, loss_fn = TINY_CASES[1].build(dtype=torch.float64)
    params = {n: p for n, p in model.named_parameters()}
    other = {k: v.clone() for k, v in batches[0].items()}
    other["input_ids"] = other["input_ids"].masked_fill(other["attention_mask"] == 0, 7)
    outs = []
    for batch in (batches[0], other):
        with eager_attention(model):
            rep = layer_gradients(model, loss_fn, batch, params, hook_plan(model, params))
        diag, norms, _, _ = rep.reduce(want_diag=True)
        outs.append((diag, norms))
    for n in params:
        if n != "model.embed_tokens.weight":  # pad rows differ by id, but hold no gradient either way
            torch.testing.assert_close(outs[0][0][n], outs[1][0][n], rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("name", ["gpt2", "tied_embedding_norms_conv1d", "reused_block_and_custom_layer", "two_branches_and_unused_output"])
def test_metrics_on_whole_models_match_brute_force(name):
    model, batches, loss_fn = CASES[name]()
    if hasattr(model, "config"):
        model.config._attn_implementation = "eager"
    want = oracle_fisher(model, batches, loss_fn)
    flow = oracle_gradient_flow(model, batches, loss_fn)
    for chunk in (None, 2):
        diag_only = FisherInformation(top_k=None, keep_diagonal=True, chunk_size=chunk).compute(model, batches, loss_fn)
        for n, d in want["diag"].items():  # reduced during the backward (nothing kept for products)
            torch.testing.assert_close(diag_only.tensors[n].reshape(-1), d, rtol=1e-6, atol=1e-9 * float(d.abs().max()), msg=n)
        got = FisherInformation(top_k=4, keep_diagonal=True, chunk_size=chunk).compute(model, batches, loss_fn)
        for key, value in want["scalars"].items():
            assert got.scalars[key] == pytest.approx(value, rel=1e-6), key
        for n, d in want["diag"].items():
            torch.testing.assert_close(got.tensors[n].reshape(-1), d, rtol=1e-6, atol=1e-9 * float(d.abs().max()), msg=n)
        assert got.arrays["top_eigenvalues"] == pytest.approx(want["eig"][:4].tolist(), rel=1e-6)
        assert got.meta["spectrum_method"] == "gram"
        gf = GradientFlow(chunk_size=chunk).compute(model, batches, loss_fn)
        for key, value in flow.items():
            if abs(value) < 1e-12 or key.endswith("snr") and not abs(value) < float("inf"):
                continue
            assert gf.scalars[key] == pytest.approx(value, rel=1e-6), key


def test_parameters_come_back_as_the_same_objects():
    """A reused block, tied weights and a vmapped custom layer: the model's parameters are the
    very same nn.Parameter objects afterwards, none of them a functorch wrapper."""
    for build in (reused_case, tied_case, gpt2_case):
        model, batches, loss_fn = build()
        before = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
        FisherInformation(top_k=2, keep_diagonal=True).compute(model, batches, loss_fn)
        GradientFlow().compute(model, batches, loss_fn)
        FisherInformation(top_k=2, method="vmap").compute(model, batches, loss_fn)
        after = dict(model.named_parameters(remove_duplicate=False))
        assert after.keys() == before.keys()
        for n, p in after.items():
            assert p is before[n], n
            assert type(p) is torch.nn.Parameter and not torch._C._functorch.is_functorch_wrapped_tensor(p), n
            assert p.grad is None


def test_hooks_are_removed_and_sdpa_shortcut_restored():
    model, batches, loss_fn = gpt2_case()
    FisherInformation(top_k=2).compute(model, batches, loss_fn)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())

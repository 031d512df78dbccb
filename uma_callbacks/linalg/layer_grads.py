r"""Per-sample gradients layer by layer, from ONE ordinary backward (forward hooks + autograd).

For a chunk of B samples with per-sample losses l_i, one forward records every call of the
layers with a rule (their inputs and outputs), and one backward of L = sum_i l_i to those
outputs gives the output gradients d [B, ..., out] (the weight-gradient products of an
ordinary backward are skipped). Because l_i depends on row i only, sample i's gradient of
a layer is a contraction of its own rows (Goodfellow 2015; Opacus' ``grad_sample`` hooks):

- ``nn.Linear`` (any number of sequence dims, flattened to T): g_{i,W} = sum_t d_{it} a_{it}^T
  [out, in], g_{i,b} = sum_t d_{it};
- GPT-2 ``Conv1D`` (y = x W + b, W [in, out]): g_{i,W} = sum_t a_{it} d_{it}^T;
- ``nn.Embedding``: g_{i,E} = sum_t e_{id_{it}} d_{it}^T (rows of the sample's tokens only;
  tokens equal to ``padding_idx`` add nothing, as in PyTorch's backward);
- ``nn.LayerNorm``: g_{i,w} = sum_t d_{it} * xhat_{it}, g_{i,b} = sum_t d_{it};
- HF RMSNorm (class name ending in ``RMSNorm`` with ``weight`` and ``variance_epsilon``:
  Qwen2, Llama, Mistral): g_{i,w} = sum_t d_{it} * xhat_{it}, xhat = x / sqrt(mean(x^2) + eps)
  recomputed with the module's own float32 ops.

Each parameter's per-sample gradient is held as one *factor* and reduced at once into what
is asked: sum_i g_i^2 (diagonal), ||g_i||^2 (norms), sum_i g_i, the Gram G G^T [B, B],
products g_i^T v and sum_i u_i g_i. Weight factors are ``_Outer`` (g_i = sum_t L_it R_it^T):

- T = 1: closed forms, no [B, p0, p1] tensor ((L^2)^T (R^2), ||L_i||^2 ||R_i||^2);
- ghost norms (Goodfellow 2015; Li et al. 2022 "ghost clipping"): ||g_i||^2 =
  sum_{t,s} (L_it . L_is)(R_it . R_is), a [T, T] kernel per sample instead of [p0, p1],
  used for the norms alone when T (p0 + p1) < p0 p1 (fewer flops, and then T^2 < p0 p1);
- otherwise one ``bmm`` per layer forms [B, p0, p1] (the largest single layer's
  per-sample gradients is the peak, never [B, P]); it is squared in place.

A parameter reached by several calls (a module used twice, tied weights) sums its
per-sample gradients BEFORE squaring: ``_Outer`` factors concatenate along T, embedding
factors too; an embedding tied to a linear head becomes an ``_Outer`` with one-hot rows.

Checks and fallback: a parameter is given to ``vmap(grad)`` (on the whole model, for the
leftover parameters only) when no rule covers it, when a call's dim 0 is not the batch,
when the model modifies a call's input in place afterwards (or its output, where the
output gradients are captured after the forward: autograd then gives the modified
tensor's; the reductions inside the backward hook the call's own output instead), or
when it is used outside its layers' forwards (a ``TorchFunctionMode`` records every op
taking a tracked parameter and producing a tensor that requires grad). Frozen parameters
are never looked at. Padding tokens contribute nothing when the loss masks them (their
output gradients are exactly zero).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.autograd.graph import get_gradient_edge
from torch.overrides import TorchFunctionMode

from uma_callbacks.core.batches import count_samples
from uma_callbacks.core.losses import LossFn
from uma_callbacks.linalg.per_sample import check_finite_losses, per_sample_grads

#: rule names, in the order they are tried
RULES = ("linear", "conv1d", "embedding", "layernorm", "rmsnorm")
#: ``"auto"`` picks ghost kernels or per-sample gradients by flops; ``"always"``/``"never"``
#: force one (tests: the results are the same either way).
GHOST = "auto"


def layer_rule(module: torch.nn.Module) -> str | None:
    """The per-layer rule for ``module`` (one of :data:`RULES`), or ``None`` (vmap).

    Subclasses that override ``forward`` get no rule (their forward is unknown).
    """
    cls = type(module)
    if isinstance(module, torch.nn.Linear) and cls.forward is torch.nn.Linear.forward:
        return "linear"
    if cls.__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        if module.weight.dim() == 2:
            return "conv1d"
    if isinstance(module, torch.nn.Embedding) and cls.forward is torch.nn.Embedding.forward:
        if module.max_norm is None and not module.scale_grad_by_freq:
            return "embedding"
        return None
    if isinstance(module, torch.nn.LayerNorm) and cls.forward is torch.nn.LayerNorm.forward:
        return "layernorm"
    if (
        cls.__name__.endswith("RMSNorm")
        and isinstance(getattr(module, "weight", None), torch.nn.Parameter)
        and hasattr(module, "variance_epsilon")
        and not any(True for _ in module.children())
    ):
        return "rmsnorm"
    return None


@dataclass
class HookPlan:
    """Which trainable parameters the hooks cover and through which modules.

    Attributes:
        names: ``{id(param): name}`` of every trainable parameter (model order).
        modules: ``[(module name, module, rule, {"weight"/"bias": param name})]`` of the
            modules with a rule and at least one trainable parameter.
        leftover: names of the parameters for ``vmap(grad)``.
        reasons: ``{param name: why it is left to vmap}``.
        expand_shared: expand embedding ids shared by the batch (dim 0 of 1, such as
            BERT's ``position_ids [1, T]``) to the batch, so that their per-sample output
            gradients exist; the broadcast they feed gives the same values. Turned off when
            the model fails with it.
    """

    names: dict[int, str]
    modules: list[tuple[str, torch.nn.Module, str, dict[str, str]]]
    leftover: list[str]
    reasons: dict[str, str] = field(default_factory=dict)
    expand_shared: bool = True
    #: parameters found used outside their layers' forward, and whether that was checked: the
    #: check (a ``TorchFunctionMode`` seeing every op, about 12% of a chunk's time on the
    #: bench Qwen2) runs on the first chunk of a computation only, since which ops take a
    #: parameter is the model's structure, not its input's (not across computations: the
    #: loss function, which may use a parameter too, can change between them)
    outside: set[str] = field(default_factory=set)
    uses_checked: bool = False


def hook_plan(model: torch.nn.Module, params: Mapping[str, torch.Tensor]) -> HookPlan:
    """Map the trainable ``params`` to the modules whose rules give their per-sample gradients.

    Args:
        model: the model.
        params: ``{name: parameter}`` to differentiate (model order).

    Returns:
        The :class:`HookPlan`; a parameter owned by no module with a rule is leftover.
    """
    names = {id(p): n for n, p in params.items()}
    covered: set[str] = set()
    modules = []
    for mod_name, module in model.named_modules():  # each module object once; every call is recorded
        rule = layer_rule(module)
        if rule is None:
            continue
        owned = {}
        for kind in ("weight", "bias"):
            p = getattr(module, kind, None)
            if isinstance(p, torch.Tensor) and id(p) in names:
                owned[kind] = names[id(p)]
        if owned:
            modules.append((mod_name, module, rule, owned))
            covered.update(owned.values())
    leftover = [n for n in params if n not in covered]
    return HookPlan(names, modules, leftover, {n: "no per-layer rule" for n in leftover})


# ---------------------------------------------------------------------------- factors
def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float64)


class _Dense:
    """Per-sample gradients held whole: ``G [B, *shape]`` (small tensors, vmap output)."""

    def __init__(self, g: torch.Tensor) -> None:
        self.g = g
        self.n = g.shape[0]

    def add(self, other: _Dense) -> _Dense:
        return _Dense(self.g + other.g)

    def flat(self) -> torch.Tensor:
        return self.g.reshape(self.n, -1)

    def nbytes(self) -> int:
        return self.g.numel() * self.g.element_size()

    def stats(self, want_diag: bool, want_sum: bool, want_gram: bool):
        f = self.flat()
        gsum = self.g.sum(0) if want_sum else None
        gram = _f64(f @ f.T) if want_gram else None
        sq = f.square()
        diag = sq.sum(0).reshape(self.g.shape[1:]) if want_diag else None
        return diag, sq.sum(1).double(), gsum, gram

    def cross_gram(self, other: Any) -> torch.Tensor:
        return _f64(self.flat() @ other.dense().reshape(other.n, -1).T)

    def dense(self) -> torch.Tensor:
        return self.g

    def dot(self, v: torch.Tensor) -> torch.Tensor:
        return self.flat() @ v.reshape(-1).to(self.g.dtype)

    def weighted_sum(self, u: torch.Tensor) -> torch.Tensor:
        return torch.tensordot(u.to(self.g.dtype), self.g, dims=1)


class _Outer:
    """g_i = sum_t L[i, t] R[i, t]^T of shape ``[p0, p1]``; L ``[B, T, p0]``, R ``[B, T, p1]``."""

    def __init__(self, left: torch.Tensor, right: torch.Tensor) -> None:
        self.left, self.right = left, right
        self.n, self.t = left.shape[0], left.shape[1]
        self.p0, self.p1 = left.shape[2], right.shape[2]

    def add(self, other: _Outer) -> _Outer:
        return _Outer(torch.cat([self.left, other.left], 1), torch.cat([self.right, other.right], 1))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.left, self.right))

    def dense(self) -> torch.Tensor:
        """``[B, p0, p1]`` (one bmm; the same flops as a weight gradient)."""
        if self.t == 1:
            return self.left[:, 0, :, None] * self.right[:, 0, None, :]
        return torch.bmm(self.left.transpose(1, 2), self.right)

    def stats(self, want_diag: bool, want_sum: bool, want_gram: bool):
        L, R = self.left, self.right
        if self.t == 1:
            l0, r0 = L[:, 0], R[:, 0]
            l2, r2 = l0.square(), r0.square()
            diag = l2.T @ r2 if want_diag else None
            norms = l2.sum(1).double() * r2.sum(1).double()
            gsum = l0.T @ r0 if want_sum else None
            gram = _f64((l0 @ l0.T) * (r0 @ r0.T)) if want_gram else None
            return diag, norms, gsum, gram
        if not want_diag and self._ghost_wins(want_sum, want_gram):
            lf, rf = L.flatten(0, 1), R.flatten(0, 1)
            gram = None
            if want_gram:  # [BT, BT] kernel, summed over each pair of samples' token blocks
                kernel = (lf @ lf.T).mul_(rf @ rf.T)
                gram = _f64(kernel.reshape(self.n, self.t, self.n, self.t).sum((1, 3)))
                norms = gram.diagonal().clone()
            else:
                kernel = torch.bmm(L, L.transpose(1, 2)).mul_(torch.bmm(R, R.transpose(1, 2)))
                norms = kernel.sum((1, 2)).double()
            gsum = lf.T @ rf if want_sum else None
            return None, norms, gsum, gram
        g = self.dense()
        gsum = g.sum(0) if want_sum else None
        gram = None
        if want_gram:
            f = g.reshape(self.n, -1)
            gram = _f64(f @ f.T)
        g.square_()
        diag = g.sum(0) if want_diag else None
        norms = g.sum((1, 2)).double()
        return diag, norms, gsum, gram

    def _ghost_wins(self, want_sum: bool, want_gram: bool) -> bool:
        """Ghost kernels take fewer flops (and no more memory) than the per-sample gradients:
        per sample T^2 (p0 + p1) against T p0 p1 (the Gram: (BT)^2 (p0 + p1) against
        B T p0 p1 + B^2 p0 p1); the grad sum costs B T p0 p1 either way."""
        if GHOST != "auto":
            return GHOST == "always" and (not want_gram or (self.n * self.t) ** 2 <= self.n * self.p0 * self.p1)
        n, t, size, width = self.n, self.t, self.p0 * self.p1, self.p0 + self.p1
        if want_gram:
            if (n * t) ** 2 > n * size:
                return False
            ghost, mat = (n * t) ** 2 * width, n * t * size + n * n * size
        else:
            ghost, mat = n * t * t * width, n * t * size + n * size
        if want_sum:
            ghost += n * t * size
        return ghost < mat

    def cross_gram(self, other: Any) -> torch.Tensor:
        if isinstance(other, _Outer) and self.t == 1 and other.t == 1:
            return _f64((self.left[:, 0] @ other.left[:, 0].T) * (self.right[:, 0] @ other.right[:, 0].T))
        return _f64(self.dense().reshape(self.n, -1) @ other.dense().reshape(other.n, -1).T)

    def dot(self, v: torch.Tensor) -> torch.Tensor:
        v = v.reshape(self.p0, self.p1).to(self.left.dtype)
        return ((self.left @ v) * self.right).sum((1, 2))

    def weighted_sum(self, u: torch.Tensor) -> torch.Tensor:
        lu = self.left * u.to(self.left.dtype)[:, None, None]
        return lu.flatten(0, 1).T @ self.right.flatten(0, 1)


class _Rows:
    """Embedding factor: g_i = sum_t e_{id_it} D_it^T ``[V, H]``, kept as the distinct rows
    of each sample: ``rows [U, H]`` at (sample ``rb [U]``, vocabulary row ``rv [U]``)."""

    def __init__(self, ids: torch.Tensor, d: torch.Tensor, vocab: int, n: int) -> None:
        # ids [B, T] (-1: padding, adds nothing), d [B, T, H]
        self.vocab, self.n, self.h = vocab, n, d.shape[-1]
        self.ids, self.d = ids, d  # kept to rebuild one-hot factors for tied weights
        valid = ids >= 0
        b = torch.arange(n, device=ids.device)[:, None].expand_as(ids)
        key = (b * vocab + ids)[valid]
        uniq, inverse = torch.unique(key, return_inverse=True)
        self.rows = torch.zeros(uniq.numel(), self.h, dtype=d.dtype, device=d.device).index_add_(0, inverse, d[valid])
        self.rb, self.rv = uniq // vocab, uniq % vocab

    def add(self, other: _Rows) -> _Rows:
        return _Rows(torch.cat([self.ids, other.ids], 1), torch.cat([self.d, other.d], 1), self.vocab, self.n)

    def to_outer(self) -> _Outer:
        """The same gradients as an :class:`_Outer` with one-hot rows ``[B, T, V]``."""
        onehot = torch.zeros(*self.ids.shape, self.vocab, dtype=self.d.dtype, device=self.d.device)
        valid = self.ids >= 0
        onehot[valid, self.ids[valid]] = 1.0
        return _Outer(onehot, self.d)

    def nbytes(self) -> int:
        return self.rows.numel() * self.rows.element_size() + 2 * self.rb.numel() * 8

    def _compact(self, vocab_rows: torch.Tensor) -> torch.Tensor:
        """``[B, len(vocab_rows), H]``: the per-sample gradients on those vocabulary rows."""
        col = torch.searchsorted(vocab_rows, self.rv)
        out = torch.zeros(self.n, vocab_rows.numel(), self.h, dtype=self.rows.dtype, device=self.rows.device)
        out[self.rb, col] = self.rows
        return out

    def stats(self, want_diag: bool, want_sum: bool, want_gram: bool):
        sq = self.rows.square()
        norms = torch.zeros(self.n, dtype=torch.float64, device=sq.device).index_add_(0, self.rb, sq.sum(1).double())
        shape = (self.vocab, self.h)
        diag = torch.zeros(shape, dtype=sq.dtype, device=sq.device).index_add_(0, self.rv, sq) if want_diag else None
        gsum = torch.zeros(shape, dtype=sq.dtype, device=sq.device).index_add_(0, self.rv, self.rows) if want_sum else None
        gram = None
        if want_gram:
            m = self._compact(torch.unique(self.rv)).reshape(self.n, -1)
            gram = _f64(m @ m.T)
        return diag, norms, gsum, gram

    def cross_gram(self, other: Any) -> torch.Tensor:
        if isinstance(other, _Rows):
            vocab_rows = torch.unique(torch.cat([self.rv, other.rv]))
            a, b = self._compact(vocab_rows), other._compact(vocab_rows)
            return _f64(a.reshape(self.n, -1) @ b.reshape(other.n, -1).T)
        return _f64(self.dense().reshape(self.n, -1) @ other.dense().reshape(other.n, -1).T)

    def dense(self) -> torch.Tensor:
        out = torch.zeros(self.n, self.vocab, self.h, dtype=self.rows.dtype, device=self.rows.device)
        out[self.rb, self.rv] = self.rows
        return out

    def dot(self, v: torch.Tensor) -> torch.Tensor:
        v = v.reshape(self.vocab, self.h).to(self.rows.dtype)
        per_row = (self.rows * v[self.rv]).sum(1)
        return torch.zeros(self.n, dtype=per_row.dtype, device=per_row.device).index_add_(0, self.rb, per_row)

    def weighted_sum(self, u: torch.Tensor) -> torch.Tensor:
        scaled = self.rows * u.to(self.rows.dtype)[self.rb, None]
        return torch.zeros(self.vocab, self.h, dtype=scaled.dtype, device=scaled.device).index_add_(0, self.rv, scaled)


class _Zero(_Dense):
    """A parameter no call reached this chunk: zero per-sample gradients, nothing stored."""

    def __init__(self, n: int, like: torch.Tensor) -> None:
        self.n, self.like = n, like

    def nbytes(self) -> int:
        return 0

    def dense(self) -> torch.Tensor:
        return torch.zeros(self.n, *self.like.shape, dtype=self.like.dtype, device=self.like.device)

    def stats(self, want_diag: bool, want_sum: bool, want_gram: bool):
        zeros = torch.zeros_like(self.like)
        norms = torch.zeros(self.n, dtype=torch.float64, device=self.like.device)
        gram = torch.zeros(self.n, self.n, dtype=torch.float64, device=self.like.device) if want_gram else None
        return (zeros if want_diag else None), norms, (zeros.clone() if want_sum else None), gram

    def cross_gram(self, other: Any) -> torch.Tensor:
        return torch.zeros(self.n, other.n, dtype=torch.float64, device=self.like.device)

    def dot(self, v: torch.Tensor) -> torch.Tensor:
        return torch.zeros(self.n, dtype=self.like.dtype, device=self.like.device)

    def weighted_sum(self, u: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(self.like)


def _merge(factors: list[Any]) -> Any:
    """One factor holding the sum of the per-sample gradients of several calls/modules."""
    if len(factors) == 1:
        return factors[0]
    kinds = {type(f) for f in factors}
    if kinds == {_Outer} or kinds == {_Rows}:
        out = factors[0]
        for f in factors[1:]:
            out = out.add(f)
        return out
    if kinds <= {_Outer, _Rows}:  # an embedding tied to a linear head: the head's bmm, the rows added in place
        outer = _merge([f for f in factors if isinstance(f, _Outer)])
        total = outer.dense()
        for rows in (f for f in factors if isinstance(f, _Rows)):
            total.index_put_((rows.rb, rows.rv), rows.rows.to(total.dtype), accumulate=True)
        return _Dense(total)
    total = factors[0].dense()
    for f in factors[1:]:
        total = total + f.dense()
    return _Dense(total)


# ---------------------------------------------------------------------------- capture
class _UseTracker(TorchFunctionMode):
    """Records tracked parameters used (to make a tensor that requires grad) outside the
    forward of the modules that own them."""

    def __init__(self, tracked: Mapping[int, str]) -> None:
        super().__init__()
        self.tracked = tracked
        self.active: dict[int, int] = {}
        self.outside: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        for arg in _tensor_args(args, kwargs):
            pid = id(arg)
            if pid in self.tracked and not self.active.get(pid) and _requires_grad(out):
                self.outside.add(self.tracked[pid])
        return out


def _tensor_args(args: Sequence[Any], kwargs: Mapping[str, Any]):
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (x for x in a if isinstance(x, torch.Tensor))


def _requires_grad(out: Any) -> bool:
    if isinstance(out, torch.Tensor):
        return out.requires_grad
    if isinstance(out, (list, tuple)):
        return any(isinstance(x, torch.Tensor) and x.requires_grad for x in out)
    return False


def _factors_of_call(rule: str, module: torch.nn.Module, x: torch.Tensor, d: torch.Tensor, n: int) -> dict[str, Any]:
    """``{"weight"/"bias": factor}`` of one call of ``module`` (input x, output gradient d)."""
    if rule == "linear":
        dd = d.reshape(n, -1, d.shape[-1])
        out = {"weight": _Outer(dd, x.reshape(n, -1, x.shape[-1]).to(d.dtype))}
        out["bias"] = _Dense(dd.sum(1))
        return out
    if rule == "conv1d":
        dd = d.reshape(n, -1, d.shape[-1])
        return {"weight": _Outer(x.reshape(n, -1, x.shape[-1]).to(d.dtype), dd), "bias": _Dense(dd.sum(1))}
    if rule == "embedding":
        ids = x.reshape(n, -1).long()
        if module.padding_idx is not None:
            ids = ids.masked_fill(ids == module.padding_idx, -1)
        return {"weight": _Rows(ids, d.reshape(n, -1, d.shape[-1]), module.num_embeddings, n)}
    if rule == "layernorm":
        dims = tuple(range(x.dim() - len(module.normalized_shape), x.dim()))
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, unbiased=False, keepdim=True)
        xhat = (x - mean) * torch.rsqrt(var + module.eps)
        shape = (n, -1, *module.normalized_shape)
        return {"weight": _Dense((d * xhat).reshape(shape).sum(1)), "bias": _Dense(d.reshape(shape).sum(1))}
    if rule == "rmsnorm":  # the module's own ops (HF: float32 statistics, cast back)
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
        xhat = h.to(x.dtype)
        return {"weight": _Dense((d * xhat).reshape(n, -1, d.shape[-1]).sum(1))}
    raise AssertionError(rule)


class _Reductions:
    """What is asked of per-parameter factors (see :meth:`LayerGradients.reduce`), filled one
    parameter at a time: handed to ``consume`` or kept, the Gram summed, the norms kept."""

    def __init__(
        self,
        n: int,
        device: torch.device,
        want_diag: bool,
        want_sum: bool,
        want_gram: bool,
        consume: Callable[[str, torch.Tensor | None, torch.Tensor | None], None] | None,
    ) -> None:
        self.want = (want_diag, want_sum, want_gram)
        self.device, self.consume = device, consume
        self.diag: dict[str, torch.Tensor] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.norms: dict[str, torch.Tensor] = {}
        self.gram = torch.zeros(n, n, dtype=torch.float64, device=device) if want_gram else None

    def add(self, name: str, factor: Any) -> None:
        d, sq, s, g = factor.stats(*self.want)
        if self.consume is not None:
            self.consume(name, d, s)
        else:
            if self.want[0]:
                self.diag[name] = d
            if self.want[1]:
                self.sums[name] = s
        if self.gram is not None:
            self.gram.add_(g.to(self.device))
        self.norms[name] = sq.to(self.device)

    def sq_norms(self, names: Sequence[str]) -> torch.Tensor:
        """``[B, len(names)]`` float64, in the order of ``names``."""
        return torch.stack([self.norms[name] for name in names], dim=1)


class LayerGradients:
    """One chunk's per-sample gradients as per-parameter factors (see the module docstring).

    Implements the ``ChunkGradients`` protocol of :mod:`~uma_callbacks.linalg.fisher_products`.

    Attributes:
        losses: ``[B]`` per-sample losses (detached).
        n: B.
        names: parameter names, model order.
        vmapped: names whose gradients came from ``vmap(grad)``.
    """

    def __init__(self, losses: torch.Tensor, factors: dict[str, Any], names: list[str], vmapped: list[str]) -> None:
        self.losses = losses
        self.n = int(losses.shape[0])
        self.names = names
        self.factors = factors
        self.vmapped = vmapped

    def nbytes(self) -> int:
        """Bytes held by the factors."""
        return sum(f.nbytes() for f in self.factors.values())

    def reduce(
        self,
        want_diag: bool = True,
        want_sum: bool = False,
        want_gram: bool = False,
        consume: Callable[[str, torch.Tensor | None, torch.Tensor | None], None] | None = None,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
        """Everything asked, one parameter at a time.

        Args:
            want_diag: form sum_i g_i^2 per parameter.
            want_sum: form sum_i g_i per parameter.
            want_gram: form G G^T.
            consume: ``(name, diag or None, sum or None)`` for each parameter in turn, which
                then are not kept: the caller adds them into its accumulators, so a chunk
                holds one parameter's sums at a time instead of the whole model's (P entries).

        Returns:
            ``(diag {name: sum_i g_i^2} (empty unless want_diag and no ``consume``),
            sq_norms [B, n_params] float64, grad_sum {name: sum_i g_i} (empty unless
            want_sum and no ``consume``), gram [B, B] float64 or None)``.
        """
        out = _Reductions(self.n, self.losses.device, want_diag, want_sum, want_gram, consume)
        for name in self.names:
            out.add(name, self.factors[name])
        return out.diag, out.sq_norms(self.names), out.sums, out.gram

    def square_stats(self, want_diag: bool = True) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``({name: sum_i g_{i,p}^2}, sq_norms [B, n_params] float64)``."""
        diag, norms, _, _ = self.reduce(want_diag=want_diag)
        return diag, norms

    def grad_sums(self) -> dict[str, torch.Tensor]:
        """``{name: sum_i g_{i,p}}``."""
        return self.reduce(want_diag=False, want_sum=True)[2]

    def gram(self) -> torch.Tensor:
        """``G G^T [B, B]`` (float64)."""
        return self.reduce(want_diag=False, want_gram=True)[3]

    def cross_gram(self, other: LayerGradients) -> torch.Tensor:
        """``G_self G_other^T [B, B']`` (float64)."""
        total = torch.zeros(self.n, other.n, dtype=torch.float64, device=self.losses.device)
        for name in self.names:
            total += self.factors[name].cross_gram(other.factors[name]).to(total.device)
        return total

    def dot(self, v: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``u [B]``, u_i = g_i^T v."""
        return sum(self.factors[n].dot(v[n]).to(self.losses.dtype) for n in self.names)

    def weighted_sum(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: sum_i u_i g_{i,p}}``."""
        return {n: self.factors[n].weighted_sum(u) for n in self.names}


@dataclass
class _Recorded:
    """One chunk's forward with the layer calls recorded (see :func:`_record_forward`).

    Attributes:
        losses: ``[B]`` per-sample losses (with their graph).
        usable: ``[(slot, plan module index, input x, output y)]`` of the calls whose
            per-sample gradients the rules give (forward order; y requires grad; slot: the
            call's number among all recorded calls).
        bad: parameters for vmap found by the run-time checks (used outside their layers,
            a call without the batch dim, an input or output modified in place after it).
    """

    losses: torch.Tensor
    usable: list[tuple[int, int, torch.Tensor, torch.Tensor]]
    bad: set[str]


def _record_forward(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batch: Any,
    params: Mapping[str, torch.Tensor],
    plan: HookPlan,
    n: int,
    on_output: Callable[[int, torch.Tensor], None] | None = None,
) -> _Recorded:
    """The chunk's forward with every call of the plan's modules recorded, and the checks
    (losses ``[B]`` and finite, parameters used outside their layers, batch dims, tensors
    modified in place after the call).

    ``on_output(slot, y)`` is called for each call's output that requires grad, as the
    call returns (a tensor hook registered then receives the gradient of that value even
    if the model later modifies it in place); with it, only the inputs' versions are checked.
    """
    records: list[tuple[int, Any, Any, int, int]] = []
    leftover = set(plan.leftover)
    tracked = {id(params[name]): name for _, _, _, owned in plan.modules for name in owned.values() if name not in leftover}
    tracker = _UseTracker(tracked) if not plan.uses_checked else None
    handles = []
    for index, (_, module, rule, owned) in enumerate(plan.modules):
        ids = [id(params[name]) for name in owned.values()]

        def pre(_m, inputs, ids=ids, rule=rule):
            if tracker is not None:
                for pid in ids:
                    tracker.active[pid] = tracker.active.get(pid, 0) + 1
            if rule == "embedding" and plan.expand_shared and n > 1 and inputs and inputs[0].dim() >= 1:
                if inputs[0].shape[0] == 1:  # ids shared by the batch (BERT's position_ids [1, T])
                    return (inputs[0].expand(n, *inputs[0].shape[1:]), *inputs[1:])
            return None

        def post(_m, inputs, output, ids=ids, index=index):
            if tracker is not None:
                for pid in ids:
                    tracker.active[pid] -= 1
            x = inputs[0] if inputs else None
            if on_output is not None and isinstance(output, torch.Tensor) and output.requires_grad:
                on_output(len(records), output)
            records.append((index, x, output, _version(x), _version(output)))

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    try:
        with torch.enable_grad(), (tracker if tracker is not None else contextlib.nullcontext()):
            losses = loss_fn(model, batch)
    except RuntimeError as err:
        # only torch's own shape complaint about the expanded ids is retried; a user's error, an
        # out-of-memory error (subclasses) or anything else propagates as it is
        if not plan.expand_shared or type(err) is not RuntimeError or not _is_shape_error(err):
            raise
        plan.expand_shared = False  # the model did not take the expanded ids: vmap those embeddings
        for handle in handles:
            handle.remove()
        return _record_forward(model, loss_fn, batch, params, plan, n, on_output)
    finally:
        for handle in handles:
            handle.remove()
    if not isinstance(losses, torch.Tensor) or losses.shape != (n,):
        raise ValueError(f"loss_fn returned shape {tuple(getattr(losses, 'shape', ()))}, not [{n}]")
    check_finite_losses(losses)
    if tracker is not None:
        plan.outside, plan.uses_checked = set(tracker.outside), True
    for name in sorted(plan.outside):
        plan.reasons[name] = "used outside its layers' forward"
    bad = set(plan.outside)
    usable = []
    for slot, (index, x, y, x_version, y_version) in enumerate(records):
        owned = plan.modules[index][3]
        ok = isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dim() >= 1 and x.shape[0] == n
        ok = ok and y.dim() >= 2 and y.shape[0] == n
        if not ok:
            for name in owned.values():
                bad.add(name)
                plan.reasons[name] = f"a call of {plan.modules[index][0]!r} has no batch dim of {n}"
            continue
        if _version(x) != x_version or (on_output is None and _version(y) != y_version):
            # the gradient autograd would give is that of the modified tensor, not the call's
            for name in owned.values():
                bad.add(name)
                plan.reasons[name] = f"a call of {plan.modules[index][0]!r} had its input or output modified in place"
            continue
        if y.requires_grad:
            usable.append((slot, index, x, y))
    return _Recorded(losses, usable, bad)


def _version(t: Any) -> int:
    """A tensor's in-place modification counter (-1 for anything else)."""
    return t._version if isinstance(t, torch.Tensor) else -1


def _vmapped_factors(
    model: torch.nn.Module, loss_fn: LossFn, batch: Any, params: Mapping[str, torch.Tensor], names: list[str]
) -> dict[str, _Dense]:
    """``vmap(grad)`` per-sample gradients of ``names`` only (the rest of the model fixed)."""
    if not names:
        return {}
    with torch.no_grad():  # no graph to the parameters vmap does not swap (grad ignores an outer no_grad)
        psg = per_sample_grads(model, loss_fn, batch, {name: params[name] for name in names})
    return {name: _Dense(g.detach()) for name, g in psg.grads.items()}


def layer_gradients(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batch: Any,
    params: Mapping[str, torch.Tensor],
    plan: HookPlan,
    before_backward: Callable[[], None] | None = None,
) -> LayerGradients:
    """One forward and one backward (to the layer outputs) of a chunk; the per-sample gradient
    factors of every parameter (``vmap(grad)`` for the plan's leftovers and for parameters
    found used outside their layers, recorded in ``plan.reasons``), all kept for later
    products (see :func:`layer_gradient_sums` for reductions formed during the backward).

    Args:
        model: the model (read only; nothing is written to ``.grad``).
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]``.
        batch: a chunk of B samples.
        params: ``{name: parameter}`` (model order), the plan's parameters.
        plan: from :func:`hook_plan` (its ``leftover``/``reasons`` grow when a check fails).
        before_backward: called between the forward and the backward (sharded models: every
            rank agrees it is healthy before FSDP's backward collectives).

    Returns:
        :class:`LayerGradients`.

    Raises:
        ValueError: the losses are not ``[B]``.
        FloatingPointError: a per-sample loss is NaN/Inf.
    """
    n = count_samples(batch)
    rec = _record_forward(model, loss_fn, batch, params, plan, n)
    if before_backward is not None:
        before_backward()
    leftover, bad, usable = set(plan.leftover), rec.bad, rec.usable
    outputs = [y for _, _, _, y in usable]
    grads = torch.autograd.grad(rec.losses.sum(), outputs, allow_unused=True) if outputs else []
    pieces: dict[str, list[Any]] = {}
    for (_, index, x, _), d in zip(usable, grads):
        _, module, rule, owned = plan.modules[index]
        if d is None or all(name in bad for name in owned.values()):
            continue
        made = _factors_of_call(rule, module, x.detach(), d.detach(), n)
        for kind, name in owned.items():
            if name not in bad and name not in leftover:
                pieces.setdefault(name, []).append(made[kind])
    del rec.usable, usable, outputs, grads
    vmap_names = [name for name in params if name in leftover or name in bad]
    factors = {name: _merge(found) for name, found in pieces.items() if name not in bad}
    for name in params:  # covered parameters no call reached: zero gradients
        if name not in factors and name not in vmap_names:
            factors[name] = _Zero(n, _full_zeros(params[name]))
    factors.update(_vmapped_factors(model, loss_fn, batch, params, vmap_names))
    return LayerGradients(rec.losses.detach(), factors, list(params), vmap_names)


@dataclass
class LayerSums:
    """One chunk's reductions of the per-sample gradients (:func:`layer_gradient_sums`).

    Attributes:
        losses: ``[B]`` per-sample losses (detached). n: B.
        diag: ``{name: sum_i g_i^2}`` (empty unless asked and no ``consume``).
        sq_norms: ``[B, n_params]`` float64, ||g_{i,p}||^2 (model order).
        grad_sum: ``{name: sum_i g_i}`` (empty unless asked and no ``consume``).
        gram: ``G G^T [B, B]`` float64 when asked, else None.
        vmapped: names whose gradients came from ``vmap(grad)``.
    """

    losses: torch.Tensor
    n: int
    diag: dict[str, torch.Tensor]
    sq_norms: torch.Tensor
    grad_sum: dict[str, torch.Tensor]
    gram: torch.Tensor | None
    vmapped: list[str]


def layer_gradient_sums(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batch: Any,
    params: Mapping[str, torch.Tensor],
    plan: HookPlan,
    *,
    want_diag: bool = True,
    want_sum: bool = False,
    want_gram: bool = False,
    consume: Callable[[str, torch.Tensor | None, torch.Tensor | None], None] | None = None,
) -> LayerSums:
    """What :meth:`LayerGradients.reduce` gives, formed DURING the backward: each layer's
    output gradient is reduced (and, with its input, released) as soon as autograd has it.

    The chunk then never holds every layer's output gradients at once (``[B, T, out]``
    each, about the activations' size again), nor keeps activations autograd would free:
    the peak is about that of an ordinary training step, plus one layer's per-sample
    gradients. A parameter reached by several calls (tied weights, a module used twice)
    is reduced when its last call's gradient arrives. The backward is asked for the
    gradients of the fewest recorded outputs (:func:`_anchor_edges`) through which it
    reaches every recorded output, so every tensor hook fires. The hooks are registered as
    each call returns, so a model that modifies an output in place later does not change
    what they receive (the capture path of :func:`layer_gradients` gives such a layer to
    vmap instead).

    Args:
        model, loss_fn, batch, params, plan: as :func:`layer_gradients`.
        want_diag, want_sum, want_gram, consume: as :meth:`LayerGradients.reduce`.

    Returns:
        :class:`LayerSums`.

    Raises:
        ValueError: the losses are not ``[B]``.
        FloatingPointError: a per-sample loss is NaN/Inf.
    """
    n = count_samples(batch)
    edges: dict[int, Any] = {}

    def on_output(slot: int, y: torch.Tensor) -> None:
        # at the call: the hook and the edge belong to this value of y, whatever the model
        # does to y in place afterwards
        edges[slot] = get_gradient_edge(y)
        y.register_hook(lambda d: on_grad(slot, d))

    rec = _record_forward(model, loss_fn, batch, params, plan, n, on_output)
    leftover, bad = set(plan.leftover), rec.bad
    skip = leftover | bad
    out = _Reductions(n, rec.losses.device, want_diag, want_sum, want_gram, consume)
    remaining: dict[str, int] = {}
    for _, index, _, _ in rec.usable:
        for name in plan.modules[index][3].values():
            if name not in skip:
                remaining[name] = remaining.get(name, 0) + 1
    pending: dict[str, list[Any]] = {}
    calls = {slot: (index, x) for slot, index, x, _ in rec.usable}  # x released as each hook fires

    lock = threading.Lock()  # a model spread over devices: autograd runs a thread per device

    def on_grad(slot: int, d: torch.Tensor | None) -> None:
        with lock:
            if slot not in calls:  # a call the checks left out (or already seen)
                return
            index, x = calls.pop(slot)
            _, module, rule, owned = plan.modules[index]
            if all(name in skip for name in owned.values()):
                return
            # an undefined gradient (a custom Function's backward returned None for it): adds nothing
            made = _factors_of_call(rule, module, x.detach(), d.detach(), n) if d is not None else {}
            del x
            for kind, name in owned.items():
                if name in skip:
                    continue
                if kind in made:
                    pending.setdefault(name, []).append(made[kind])
                remaining[name] -= 1
                if remaining[name] == 0 and name in pending:
                    out.add(name, _merge(pending.pop(name)))

    anchors = _anchor_edges([edges[slot] for slot, _, _, _ in rec.usable])
    rec.usable = []  # the outputs are not held: autograd frees what it no longer needs
    edges.clear()
    if anchors:
        torch.autograd.grad(rec.losses.sum(), anchors, allow_unused=True)
    del anchors
    calls.clear()
    for name, found in pending.items():  # a call whose output the loss does not use: no gradient
        out.add(name, _merge(found))
    vmap_names = [name for name in params if name in skip]
    for name in params:  # covered parameters no call reached: zero gradients
        if name not in out.norms and name not in vmap_names:
            out.add(name, _Zero(n, _full_zeros(params[name])))
    for name, factor in _vmapped_factors(model, loss_fn, batch, params, vmap_names).items():
        out.add(name, factor)
    return LayerSums(rec.losses.detach(), n, out.diag, out.sq_norms(list(params)), out.sums, out.gram, vmap_names)


def _anchor_edges(edges: list[Any]) -> list[Any]:
    """The fewest of the outputs' gradient edges (forward order) whose gradients a backward
    must compute to reach every output's node (so that a tensor hook on each one fires).

    An edge is covered when its node reaches (through ``next_functions``) the node of an
    earlier anchor or covered edge; otherwise it becomes an anchor. Edges come in forward
    order, so a node found not to reach any is never reached by a later one: it is
    remembered as dead. In a transformer the anchors are the embeddings' outputs (and the
    first layer's on non-token inputs); the search stops at the previous layer's outputs,
    so it visits each node about once. Edges (``get_gradient_edge`` at the call), not the
    tensors, so that an output the model modifies in place later still names its call's node.
    """
    alive: set[Any] = set()
    dead: set[Any] = set()
    anchors = []
    for edge in edges:
        node = edge.node
        if node in alive:
            continue
        seen, stack, found = {node}, [node], False
        while stack and not found:
            for nxt, _ in stack.pop().next_functions:
                if nxt is None or nxt in seen or nxt in dead:
                    continue
                if nxt in alive:
                    found = True
                    break
                seen.add(nxt)
                stack.append(nxt)
        if not found:
            dead |= seen - {node}
            anchors.append(edge)
        alive.add(node)
    return anchors


def _full_zeros(param: torch.Tensor) -> torch.Tensor:
    """Zeros shaped like ``param``'s full tensor (a DTensor shard's global shape), plain."""
    piece = param.to_local() if hasattr(param, "to_local") else param
    return torch.zeros(param.shape, dtype=param.dtype, device=piece.device)


def per_sample_bytes_fraction(params: Mapping[str, torch.Tensor]) -> float:
    """The largest single parameter's share of all trainable entries: what the hooks path
    holds per sample at once (one layer's [B, *shape]), at most 1."""
    sizes = [p.numel() for p in params.values()]
    return max(sizes) / max(1, sum(sizes)) if sizes else 1.0


def _is_shape_error(err: RuntimeError) -> bool:
    """Whether ``err`` is torch complaining about sizes or shapes (the expanded shared ids)."""
    text = str(err).lower()
    return any(word in text for word in ("size", "shape", "dimension", "expand", "broadcast"))

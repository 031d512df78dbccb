r"""Per-sample gradients layer by layer, from ONE ordinary backward (forward hooks + autograd).

For a chunk of B samples with per-sample losses l_i, one forward records every call of the
layers with a rule (their inputs and outputs), and one backward of L = sum_i l_i to those
outputs gives the output gradients d [B, ..., out] (the weight-gradient products of an
ordinary backward are skipped). Because l_i depends on row i only, sample i's gradient of
a layer is a contraction of its own rows (Goodfellow 2015; Opacus' ``grad_sample`` hooks).
The rules, one file per layer type, are in :mod:`uma_callbacks.linalg.layers`, registered
by module type (:func:`~uma_callbacks.linalg.layers.register_layer_rule`): ``nn.Linear``
(any number of sequence dims), GPT-2 ``Conv1D``, ``nn.Embedding`` (``padding_idx`` adds
nothing), ``nn.LayerNorm`` and HF RMSNorm; this module holds the hooks that run them.

Each parameter's per-sample gradient is held as one *factor*
(:mod:`uma_callbacks.linalg.layers.factors`) and reduced at once into what is asked:
sum_i g_i^2 (diagonal), ||g_i||^2 (norms), sum_i g_i, the Gram G G^T [B, B], products
g_i^T v and sum_i u_i g_i; weight factors are outer products (closed forms for T = 1, ghost
norms where cheaper, else one layer's [B, p0, p1] at a time, never [B, P]).

A parameter reached by several calls (a module used twice, tied weights) sums its
per-sample gradients BEFORE squaring: outer-product factors concatenate along T, embedding
factors too; an embedding tied to a linear head becomes an outer product with one-hot rows.

Checks and fallback: a parameter is given to ``vmap(grad)``
(:mod:`uma_callbacks.linalg.layers.vmap_fallback`; on the whole model, for the leftover
parameters only) when no rule covers it, when a call's dim 0 is not the batch,
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
from uma_callbacks.linalg.layers import LayerRule, find_layer_rule
from uma_callbacks.linalg.layers.factors import Factor, Zero, merge_factors
from uma_callbacks.linalg.layers.reductions import LayerGradients, Reductions
from uma_callbacks.linalg.layers.vmap_fallback import vmapped_factors
from uma_callbacks.linalg.per_sample import check_finite_losses

__all__ = [
    "RULES",
    "HookPlan",
    "LayerGradients",
    "LayerSums",
    "hook_plan",
    "layer_gradient_sums",
    "layer_gradients",
    "layer_rule",
    "per_sample_bytes_fraction",
]

#: names of the built-in rules (:mod:`uma_callbacks.linalg.layers`); others may be registered
RULES = ("linear", "conv1d", "embedding", "layernorm", "rmsnorm")


def layer_rule(module: torch.nn.Module) -> str | None:
    """The name of the per-layer rule for ``module`` (such as one of :data:`RULES`), or ``None`` (vmap).

    Subclasses that override ``forward`` get no rule (their forward is unknown); see
    :func:`~uma_callbacks.linalg.layers.find_layer_rule`.
    """
    rule = find_layer_rule(module)
    return rule.name if rule is not None else None


@dataclass
class HookPlan:
    """Which trainable parameters the hooks cover and through which modules.

    Attributes:
        names: ``{id(param): name}`` of every trainable parameter (model order).
        modules: ``[(module name, module, rule, {attribute ("weight", "bias"): param name})]``
            of the modules with a rule (a :class:`~uma_callbacks.linalg.layers.LayerRule`)
            and at least one trainable parameter.
        leftover: names of the parameters for ``vmap(grad)``.
        reasons: ``{param name: why it is left to vmap}``.
        expand_shared: let the rules' ``batch_inputs`` expand inputs shared by the batch
            to it (an embedding's ids with dim 0 of 1, such as BERT's ``position_ids [1, T]``),
            so that their per-sample output gradients exist; the broadcast they feed gives
            the same values. Turned off when the model fails with it.
    """

    names: dict[int, str]
    modules: list[tuple[str, torch.nn.Module, LayerRule, dict[str, str]]]
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
        rule = find_layer_rule(module)
        if rule is None:
            continue
        owned = {}
        for kind in rule.params:
            p = getattr(module, kind, None)
            if isinstance(p, torch.Tensor) and id(p) in names:
                owned[kind] = names[id(p)]
        if owned:
            modules.append((mod_name, module, rule, owned))
            covered.update(owned.values())
    leftover = [n for n in params if n not in covered]
    return HookPlan(names, modules, leftover, {n: "no per-layer rule" for n in leftover})


# ---------------------------------------------------------------------------- capture
class _UseTracker(TorchFunctionMode):
    """Records tracked parameters used outside the forward of the modules that own them.

    A use counts when the op makes a tensor that requires grad.
    """

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


def _call_factors(
    rule: LayerRule, module: torch.nn.Module, x: torch.Tensor, d: torch.Tensor, n: int, owned: Mapping[str, str]
) -> dict[str, Factor]:
    """``{attribute: factor}`` of one call of ``module`` (input x, output gradient d) by its rule.

    Raises:
        KeyError: the rule gave no factor for a parameter it covers (a rule's bug).
    """
    made = rule.factors(module, x, d, n)
    missing = [kind for kind in owned if kind not in made]
    if missing:
        raise KeyError(f"layer rule {rule.name!r} gave no factor for {missing} of {type(module).__name__}")
    return made


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
    """The chunk's forward with every call of the plan's modules recorded, and the checks.

    The checks: losses ``[B]`` and finite, parameters used outside their layers, batch
    dims, tensors modified in place after the call.

    ``on_output(slot, y)`` is called for each call's output that requires grad, as the
    call returns (a tensor hook registered then receives the gradient of that value even
    if the model later modifies it in place); with it, only the inputs' versions are checked.

    Raises:
        ValueError: the losses are not ``[B]``.
        FloatingPointError: a per-sample loss is NaN/Inf.
        RuntimeError: the model's own errors (after one retry without expanded shared ids
            when torch complained about their shape).
    """  # noqa: DOC502 (FloatingPointError: raised by check_finite_losses)
    records: list[tuple[int, Any, Any, int, int]] = []
    leftover = set(plan.leftover)
    tracked = {id(params[name]): name for _, _, _, owned in plan.modules for name in owned.values() if name not in leftover}
    tracker = _UseTracker(tracked) if not plan.uses_checked else None
    handles = []
    for index, (_, module, rule, owned) in enumerate(plan.modules):
        ids = [id(params[name]) for name in owned.values()]

        def pre(m, inputs, ids=ids, rule=rule):
            if tracker is not None:
                for pid in ids:
                    tracker.active[pid] = tracker.active.get(pid, 0) + 1
            if rule.batch_inputs is not None and plan.expand_shared:  # ids shared by the batch (embedding)
                return rule.batch_inputs(m, inputs, n)
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


def layer_gradients(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batch: Any,
    params: Mapping[str, torch.Tensor],
    plan: HookPlan,
    before_backward: Callable[[], None] | None = None,
) -> LayerGradients:
    """One forward and one backward (to the layer outputs) of a chunk: every parameter's factors.

    The per-sample gradient factors of every parameter (``vmap(grad)`` for the plan's
    leftovers and for parameters found used outside their layers, recorded in
    ``plan.reasons``), all kept for later products (see :func:`layer_gradient_sums` for
    reductions formed during the backward).

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
    """  # noqa: DOC502 (raised by _record_forward)
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
        made = _call_factors(rule, module, x.detach(), d.detach(), n, owned)
        for kind, name in owned.items():
            if name not in bad and name not in leftover:
                pieces.setdefault(name, []).append(made[kind])
    del rec.usable, usable, outputs, grads
    vmap_names = [name for name in params if name in leftover or name in bad]
    factors = {name: merge_factors(found) for name, found in pieces.items() if name not in bad}
    for name in params:  # covered parameters no call reached: zero gradients
        if name not in factors and name not in vmap_names:
            factors[name] = Zero(n, _full_zeros(params[name]))
    factors.update(vmapped_factors(model, loss_fn, batch, params, vmap_names))
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
    """What :meth:`LayerGradients.reduce` gives, formed DURING the backward.

    Each layer's output gradient is reduced (and, with its input, released) as soon as
    autograd has it.

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
        model: as :func:`layer_gradients`.
        loss_fn: as :func:`layer_gradients`.
        batch: as :func:`layer_gradients`.
        params: as :func:`layer_gradients`.
        plan: as :func:`layer_gradients`.
        want_diag: as :meth:`LayerGradients.reduce`.
        want_sum: as :meth:`LayerGradients.reduce`.
        want_gram: as :meth:`LayerGradients.reduce`.
        consume: as :meth:`LayerGradients.reduce`.

    Returns:
        :class:`LayerSums`.

    Raises:
        ValueError: the losses are not ``[B]``.
        FloatingPointError: a per-sample loss is NaN/Inf.
    """  # noqa: DOC502 (raised by _record_forward)
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
    out = Reductions(n, rec.losses.device, want_diag, want_sum, want_gram, consume)
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
            made = _call_factors(rule, module, x.detach(), d.detach(), n, owned) if d is not None else {}
            del x
            for kind, name in owned.items():
                if name in skip:
                    continue
                if kind in made:
                    pending.setdefault(name, []).append(made[kind])
                remaining[name] -= 1
                if remaining[name] == 0 and name in pending:
                    out.add(name, merge_factors(pending.pop(name)))

    anchors = _anchor_edges([edges[slot] for slot, _, _, _ in rec.usable])
    rec.usable = []  # the outputs are not held: autograd frees what it no longer needs
    edges.clear()
    if anchors:
        torch.autograd.grad(rec.losses.sum(), anchors, allow_unused=True)
    del anchors
    calls.clear()
    for name, found in pending.items():  # a call whose output the loss does not use: no gradient
        out.add(name, merge_factors(found))
    vmap_names = [name for name in params if name in skip]
    for name in params:  # covered parameters no call reached: zero gradients
        if name not in out.norms and name not in vmap_names:
            out.add(name, Zero(n, _full_zeros(params[name])))
    for name, factor in vmapped_factors(model, loss_fn, batch, params, vmap_names).items():
        out.add(name, factor)
    return LayerSums(rec.losses.detach(), n, out.diag, out.sq_norms(list(params)), out.sums, out.gram, vmap_names)


def _anchor_edges(edges: list[Any]) -> list[Any]:
    """The fewest of the outputs' gradient edges (forward order) a backward must compute.

    A backward that computes their gradients reaches every output's node (so that a tensor
    hook on each one fires).

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
    """The largest single parameter's share of all trainable entries, at most 1.

    That is what the hooks path holds per sample at once (one layer's [B, *shape]).
    """
    sizes = [p.numel() for p in params.values()]
    return max(sizes) / max(1, sum(sizes)) if sizes else 1.0


def _is_shape_error(err: RuntimeError) -> bool:
    """Whether ``err`` is torch complaining about sizes or shapes (the expanded shared ids)."""
    text = str(err).lower()
    return any(word in text for word in ("size", "shape", "dimension", "expand", "broadcast"))

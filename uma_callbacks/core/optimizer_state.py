"""An optimizer's state as the metrics see it: per parameter name, its moments and step; per group, its hyper-parameters.

Two sources give the same :class:`OptimizerSnapshot`:

- a live ``torch.optim.Optimizer`` (the Trainer's, an accelerator's prepared ones):
  :func:`from_optimizer` maps each state to its parameter by identity, no copies;
- a saved ``optimizer.state_dict()`` (the Trainer's ``optimizer.pt``, Accelerate's
  ``optimizer.bin``), whose states are keyed by the index of the parameter in
  ``param_groups`` order: :func:`from_state_dict` names them from candidate orders of the
  model's parameter names, the first whose shapes all agree, and records the first
  mismatch otherwise.

Nothing here raises for a state that does not fit: the reason is kept in
:attr:`OptimizerSnapshot.error` (the metric turns it into an error record) or
:attr:`OptimizerSnapshot.missing` (a skip record), so a measurement never stops on it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

#: Keys of an Adam/AdamW per-parameter state (``max_exp_avg_sq`` with ``amsgrad``).
ADAM_STATE_KEYS = frozenset({"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"})
#: Optimizer classes whose update is Adam's (torch's Adam and AdamW; AdamW is Adam with
#: decoupled weight decay).
ADAM_KINDS = ("Adam", "AdamW")
#: Group hyper-parameters kept (JSON-able values only).
GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay")


@dataclass
class OptimizerSnapshot:
    """An optimizer's per-parameter state, by parameter name.

    Attributes:
        kind: the optimizer's class name (``"AdamW"``, ``"SGD"``, ...; for a saved state
            dict, inferred from its keys: ``"AdamW"`` or ``"Adam"`` from the groups'
            ``decoupled_weight_decay``, else a description of what it holds).
        params: ``{param name: {"step", "exp_avg", "exp_avg_sq"[, "max_exp_avg_sq"]: tensor}}``,
            the optimizer's own tensors (not copies); parameters without state (never
            stepped) are absent.
        groups: one dict per param group: its hyper-parameters (:data:`GROUP_KEYS` that it
            has) and ``"params"``, the names of its parameters in order.
        source: where it came from (``"optimizer"`` for a live one, a file name).
        error: why the state cannot be read against the model (the first mismatch);
            ``""`` when it can.
        missing: why there is no state at all (no optimizer file, no prepared optimizer);
            ``""`` when there is one.
    """

    kind: str
    params: Mapping[str, Mapping[str, torch.Tensor]] = field(default_factory=dict)
    groups: tuple[Mapping[str, Any], ...] = ()
    source: str = "optimizer"
    error: str = ""
    missing: str = ""
    _group_of: dict[str, int] | None = field(default=None, repr=False)

    @classmethod
    def unavailable(cls, reason: str, source: str = "") -> OptimizerSnapshot:
        """A state standing for none, with the reason (the metric's skip record names it)."""
        return cls(kind="", source=source, missing=reason)

    @classmethod
    def failed(cls, reason: str, kind: str = "", source: str = "") -> OptimizerSnapshot:
        """A state that could not be read against the model (the metric's error record names ``reason``)."""
        return cls(kind=kind, source=source, error=reason)

    @property
    def is_adam(self) -> bool:
        """Whether the update rule is Adam's (:data:`ADAM_KINDS`)."""
        return self.kind in ADAM_KINDS

    def group_of(self, name: str) -> Mapping[str, Any]:
        """The hyper-parameters of the group holding parameter ``name``.

        Raises:
            KeyError: no group holds ``name``.
        """  # noqa: DOC502 (the lookup's own KeyError)
        if self._group_of is None:
            self._group_of = {n: i for i, g in enumerate(self.groups) for n in g.get("params", ())}
        return self.groups[self._group_of[name]]

    def identity(self) -> str:
        """A JSON string of everything but the tensors' values: kind, source kind, groups and the tensors' shapes.

        The tensors' values are fingerprinted by the engine (it owns the fingerprint).
        """
        shapes = {n: {k: [str(v.dtype), list(v.shape)] for k, v in sorted(s.items())} for n, s in sorted(self.params.items())}
        return json.dumps(
            {
                "kind": self.kind,
                "groups": [_jsonable(g) for g in self.groups],
                "shapes": shapes,
                "error": self.error,
                "missing": self.missing,
            },
            sort_keys=True,
        )

    def flat_tensors(self) -> dict[str, torch.Tensor]:
        """``{"<param name>/<key>": tensor}`` of every state tensor (for a fingerprint)."""
        return {f"{n}/{k}": v for n, s in self.params.items() for k, v in s.items() if isinstance(v, torch.Tensor)}

    def fingerprint_of_meta(self) -> str:
        """SHA-256 of :meth:`identity` (16 hex characters)."""
        return hashlib.sha256(self.identity().encode()).hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist() if value.numel() == 1 else f"tensor{tuple(value.shape)}"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


def _hyper(group: Mapping[str, Any]) -> dict[str, Any]:
    """The kept hyper-parameters of a param group (:data:`GROUP_KEYS`), tensors as floats."""
    out: dict[str, Any] = {}
    for key in GROUP_KEYS:
        if key not in group:
            continue
        value = group[key]
        if isinstance(value, torch.Tensor):
            value = float(value.detach().cpu().reshape(-1)[0]) if value.numel() == 1 else None
        if isinstance(value, (list, tuple)):
            value = tuple(float(v) if isinstance(v, (int, float, torch.Tensor)) else v for v in value)
        out[key] = value
    return out


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer under wrappers (Accelerate's ``AcceleratedOptimizer``, ``LightningOptimizer``)."""
    seen = 0
    while not isinstance(optimizer, torch.optim.Optimizer) or type(optimizer).__name__ == "AcceleratedOptimizer":
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if inner is None or inner is optimizer or seen > 4:
            break
        optimizer, seen = inner, seen + 1
    return optimizer


def from_optimizer(optimizers: Any, model: torch.nn.Module) -> OptimizerSnapshot:
    """The state of a live optimizer (or several), by the names of ``model``'s parameters.

    Each parameter of the optimizer's groups is named by identity with
    ``model.named_parameters()``. With several optimizers (a list), the groups of those that
    hold at least one of the model's parameters are taken, in order.

    Args:
        optimizers: a ``torch.optim.Optimizer`` (or a wrapper of one), or a sequence of them.
        model: the model the optimizer steps.

    Returns:
        The :class:`OptimizerSnapshot`; :meth:`OptimizerSnapshot.failed` naming the first parameter
        that is not the model's; :meth:`OptimizerSnapshot.unavailable` when none holds the model's
        parameters.
    """
    many = list(optimizers) if isinstance(optimizers, (list, tuple)) else [optimizers]
    names = {id(p): n for n, p in model.named_parameters()}
    taken = [
        opt for opt in map(unwrap_optimizer, many)
        if any(id(p) in names for g in getattr(opt, "param_groups", ()) for p in g["params"])
    ]  # fmt: skip
    if not taken:
        return OptimizerSnapshot.unavailable("no optimizer given holds a parameter of the measured model")
    kinds = sorted({type(o).__name__ for o in taken})
    kind = kinds[0] if len(kinds) == 1 else "+".join(kinds)
    params: dict[str, Mapping[str, torch.Tensor]] = {}
    groups: list[Mapping[str, Any]] = []
    for opt in taken:
        for gi, group in enumerate(opt.param_groups):
            member: list[str] = []
            for pi, p in enumerate(group["params"]):
                name = names.get(id(p))
                if name is None:
                    return OptimizerSnapshot.failed(
                        f"the optimizer's parameter #{pi} of group {gi} (shape {list(p.shape)}) is not a parameter "
                        "of the measured model",
                        kind,
                    )
                member.append(name)
                state = opt.state.get(p)
                if state:
                    params[name] = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
            groups.append({**_hyper(group), "params": tuple(member)})
    return OptimizerSnapshot(kind=kind, params=params, groups=tuple(groups), source="optimizer")


def infer_kind(state_dict: Mapping[str, Any]) -> str:
    """The optimizer class a saved state dict is from, as far as its keys tell.

    ``"AdamW"`` / ``"Adam"``: every per-parameter state holds Adam's keys only
    (:data:`ADAM_STATE_KEYS`) and the groups have ``amsgrad`` and no ``momentum_decay`` (NAdam)
    or ``foreach``-less RAdam layout; ``decoupled_weight_decay`` tells AdamW from Adam (torch
    >= 2.5 saves it; an older file without it counts as ``"AdamW"`` when a group has a
    weight decay, which the Trainer's AdamW default applies decoupled). Otherwise a
    description naming the state keys found (``"optimizer with state keys ['momentum_buffer']"``).

    Example:
        >>> infer_kind({"state": {0: {"momentum_buffer": torch.zeros(1)}}, "param_groups": [{"momentum": 0.9, "params": [0]}]})
        "optimizer with state keys ['momentum_buffer']"
    """
    keys = sorted({k for s in state_dict.get("state", {}).values() if isinstance(s, Mapping) for k in s})
    groups = [g for g in state_dict.get("param_groups", []) if isinstance(g, Mapping)]
    adam_groups = bool(groups) and all("amsgrad" in g and "betas" in g and "momentum_decay" not in g for g in groups)
    if keys and set(keys) <= ADAM_STATE_KEYS and {"exp_avg", "exp_avg_sq"} <= set(keys) and adam_groups:
        flags = {g.get("decoupled_weight_decay") for g in groups}
        if flags == {True}:
            return "AdamW"
        if flags == {False}:
            return "Adam"
        return "AdamW"
    return f"optimizer with state keys {keys}"


def from_state_dict(
    state_dict: Any,
    orders: Sequence[tuple[str, Sequence[str], Sequence[int] | None]],
    shapes: Mapping[str, Sequence[int]],
    source: str,
) -> OptimizerSnapshot:
    """Name a saved ``optimizer.state_dict()`` after the model's parameters.

    The saved state keys each parameter by its index in ``param_groups`` order. Each
    candidate order is a list of parameter names, one per index; the first candidate whose
    length (and group sizes, where it gives them) match the groups' and whose shapes agree
    with every state tensor (``exp_avg``/``exp_avg_sq`` against ``shapes[name]``) names the
    state.

    Args:
        state_dict: what ``torch.load(..., weights_only=True)`` returned (checked here: a
            dict with ``"state"`` and ``"param_groups"``).
        orders: ``[(label, names, group sizes or None)]``: the candidate orders, most likely
            first (e.g. the Trainer's decay/no-decay groups, then the model's parameter order).
        shapes: ``{param name: shape}`` of the model's parameters.
        source: the file's name, for the messages.

    Returns:
        The named :class:`OptimizerSnapshot`, or :meth:`OptimizerSnapshot.failed` naming each
        candidate's first mismatch (or what is malformed in the file).
    """
    if (
        not isinstance(state_dict, Mapping)
        or not isinstance(state_dict.get("state"), Mapping)
        or not isinstance(state_dict.get("param_groups"), list)
    ):
        return OptimizerSnapshot.failed(f"{source} is not an optimizer state dict (no 'state' and 'param_groups')", source=source)
    groups_in = state_dict["param_groups"]
    ids: list[Any] = []
    for gi, g in enumerate(groups_in):
        if not isinstance(g, Mapping) or not isinstance(g.get("params"), list):
            return OptimizerSnapshot.failed(f"{source}: param group {gi} has no list of params", source=source)
        ids.extend(g["params"])
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids) or len(set(ids)) != len(ids):
        return OptimizerSnapshot.failed(f"{source}: the param groups' params are not distinct integer ids", source=source)
    known = set(ids)
    problems: list[str] = []
    kind = infer_kind(state_dict)
    for pid, s in state_dict["state"].items():
        if pid not in known:
            return OptimizerSnapshot.failed(f"{source}: state entry {pid!r} is in no param group", kind, source)
        if not isinstance(s, Mapping):
            return OptimizerSnapshot.failed(f"{source}: state entry {pid!r} is not a dict", kind, source)
    sizes = [len(g["params"]) for g in groups_in]
    for label, names, want_sizes in orders:
        if want_sizes is not None and list(want_sizes) != sizes:
            problems.append(
                f"{source} has param groups of {sizes} parameters; the model's {label} order gives {list(want_sizes)}"
            )
            continue
        problem = _order_mismatch(state_dict["state"], ids, list(names), shapes, source, label)
        if not problem:
            return _named(state_dict, ids, list(names), kind, source)
        problems.append(problem)
    return OptimizerSnapshot.failed("; ".join(problems) or f"{source}: no candidate parameter order", kind, source)


def _order_mismatch(
    states: Mapping[Any, Any], ids: list[Any], names: list[str], shapes: Mapping[str, Sequence[int]], source: str, label: str
) -> str:
    """``""`` when ``names`` (one per id) fit the saved states' shapes, else the first mismatch."""
    if len(names) != len(ids):
        return f"{source} holds {len(ids)} parameters in its param groups; the model's {label} order has {len(names)}"
    for index, (pid, name) in enumerate(zip(ids, names)):
        state = states.get(pid)
        if not state:
            continue
        want = list(shapes[name])
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
            t = state.get(key)
            if isinstance(t, torch.Tensor) and list(t.shape) != want:
                return (
                    f"{source}: the state of parameter #{index} ({key}, shape {list(t.shape)}) does not match "
                    f"{name!r} (shape {want}) in the model's {label} order"
                )
    return ""


def _named(state_dict: Mapping[str, Any], ids: list[Any], names: list[str], kind: str, source: str) -> OptimizerSnapshot:
    by_id = dict(zip(ids, names))
    params = {
        by_id[pid]: {k: v for k, v in s.items() if isinstance(v, torch.Tensor)}
        for pid, s in state_dict["state"].items()
        if s
    }  # fmt: skip
    groups = tuple({**_hyper(g), "params": tuple(by_id[p] for p in g["params"])} for g in state_dict["param_groups"])
    return OptimizerSnapshot(kind=kind, params=params, groups=groups, source=source)

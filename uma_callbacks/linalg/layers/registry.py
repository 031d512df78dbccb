"""The registry of per-layer per-sample gradient rules, looked up by module type.

A rule turns one call of a layer (its input ``x`` and its output gradient ``d``, both with
the batch in dim 0) into the per-sample gradient factors of the layer's parameters, the way
Opacus' ``register_grad_sampler`` maps a module type to its grad sampler. A new layer type
needs one new file with its rule and its registration, and nothing else::

    from uma_callbacks.linalg.layers import Dense, register_layer_rule

    @register_layer_rule(Scale, params=("w",))
    def scale_rule(module, x, d, n):  # y = x * w, w [H]: g_{i,w} = sum_t d_{it} * x_{it}
        return {"w": Dense((d * x).reshape(n, -1, x.shape[-1]).sum(1))}

A module gets the rule of the nearest class in its MRO that has one, provided it keeps that
class's ``forward`` (a subclass that overrides ``forward`` computes something the rule does
not know, so it gets none and its parameters go to ``vmap(grad)``). Rules for classes that
are matched by their structure rather than their type (the many copies of HF's RMSNorm, one
per model file) are registered with :func:`register_layer_rule_matching` and tried after the
type rules, in registration order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from uma_callbacks.linalg.layers.factors import Factor

#: ``rule(module, x, d, n) -> {parameter attribute: factor}``: x the call's first input, d
#: the gradient of the summed loss to its output (both ``[n, ...]``), n the number of samples
FactorsFn = Callable[[Any, torch.Tensor, torch.Tensor, int], dict[str, Factor]]
#: ``batch_inputs(module, inputs, n) -> inputs or None``: called before each call, it may
#: give inputs whose dim 0 is the batch (an embedding's ids shared by the batch)
BatchInputsFn = Callable[[Any, tuple[Any, ...], int], tuple[Any, ...] | None]


@dataclass(frozen=True)
class LayerRule:
    """One registered rule.

    Attributes:
        name: the rule's name (``"linear"``, ...), shown by :func:`find_layer_rule`'s callers.
        factors: the rule (:data:`FactorsFn`).
        params: the module attributes holding the parameters it covers (``"weight"``, ``"bias"``).
        accepts: an extra check of the module instance (``None``: every instance).
        batch_inputs: see :data:`BatchInputsFn` (``None``: the inputs as they are).
    """

    name: str
    factors: FactorsFn
    params: tuple[str, ...] = ("weight", "bias")
    accepts: Callable[[torch.nn.Module], bool] | None = None
    batch_inputs: BatchInputsFn | None = None


_BY_TYPE: dict[type, LayerRule] = {}
_MATCHING: list[LayerRule] = []


def _make_rule(
    fn: FactorsFn,
    name: str | None,
    params: Sequence[str],
    accepts: Callable[[torch.nn.Module], bool] | None,
    batch_inputs: BatchInputsFn | None,
) -> LayerRule:
    if not callable(fn):
        raise ValueError(f"a layer rule must be a function (module, x, d, n) -> factors; got {fn!r}")
    params = tuple(params)
    if not params or not all(isinstance(p, str) and p for p in params):
        raise ValueError(f"params must be a non-empty sequence of attribute names; got {params!r}")
    return LayerRule(str(name or getattr(fn, "__name__", "rule")), fn, params, accepts, batch_inputs)


def register_layer_rule(
    module_type: type,
    *,
    name: str | None = None,
    params: Sequence[str] = ("weight", "bias"),
    accepts: Callable[[torch.nn.Module], bool] | None = None,
    batch_inputs: BatchInputsFn | None = None,
) -> Callable[[FactorsFn], FactorsFn]:
    """Decorator: register ``rule`` for ``module_type`` and its subclasses that keep its forward.

    Registering a type again replaces its rule.

    Args:
        module_type: a subclass of ``torch.nn.Module``.
        name: the rule's name (default: the function's name).
        params: the module attributes holding the parameters the rule covers.
        accepts: an extra check of the instance (``False``: no rule, vmap).
        batch_inputs: see :data:`BatchInputsFn`.

    Returns:
        The decorator, which returns the function unchanged.

    Raises:
        ValueError: ``module_type`` is not a module class, or ``params`` is empty.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, torch.nn.Module)):
        raise ValueError(f"module_type must be a subclass of torch.nn.Module; got {module_type!r}")

    def register(fn: FactorsFn) -> FactorsFn:
        _BY_TYPE[module_type] = _make_rule(fn, name, params, accepts, batch_inputs)
        return fn

    return register


def register_layer_rule_matching(
    accepts: Callable[[torch.nn.Module], bool],
    *,
    name: str | None = None,
    params: Sequence[str] = ("weight", "bias"),
    batch_inputs: BatchInputsFn | None = None,
) -> Callable[[FactorsFn], FactorsFn]:
    """Decorator: register ``rule`` for every module that ``accepts(module)`` is true of.

    These rules are tried after the type rules, in registration order; they are for layer
    classes defined in many places under one structure (HF's per-model RMSNorm copies).

    Args:
        accepts: the check of a module instance.
        name: the rule's name (default: the function's name).
        params: the module attributes holding the parameters the rule covers.
        batch_inputs: see :data:`BatchInputsFn`.

    Returns:
        The decorator, which returns the function unchanged.

    Raises:
        ValueError: ``accepts`` is not callable, or ``params`` is empty.
    """
    if not callable(accepts):
        raise ValueError(f"accepts must be a function (module) -> bool; got {accepts!r}")

    def register(fn: FactorsFn) -> FactorsFn:
        _MATCHING.append(_make_rule(fn, name, params, accepts, batch_inputs))
        return fn

    return register


def find_layer_rule(module: torch.nn.Module) -> LayerRule | None:
    """The rule for ``module``, or ``None`` (its parameters go to ``vmap(grad)``).

    The nearest class in the module's MRO with a registered rule decides: its rule when the
    module keeps that class's ``forward`` and the rule accepts the instance, else none.
    Without a type rule, the matching rules are tried in registration order.
    """
    cls = type(module)
    for base in cls.__mro__:
        rule = _BY_TYPE.get(base)
        if rule is None:
            continue
        if cls.forward is getattr(base, "forward", None):
            return rule if rule.accepts is None or rule.accepts(module) else None
        break  # forward overridden: unknown to the rule
    for rule in _MATCHING:
        if rule.accepts is not None and rule.accepts(module):
            return rule
    return None

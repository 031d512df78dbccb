"""Per-sample gradient statistics of ``nn.Linear`` layers from activations and output gradients.

For a linear layer y = W a + b applied to a chunk of B samples, with inputs a [B, T, in]
(T = 1 for 2-D inputs) and output gradients d = dL/dy [B, T, out] of the summed loss
L = sum_i l_i, sample i's gradient is (Goodfellow 2015, "Efficient per-example gradient
computations"; the BackPACK ``SumGradSquared`` trick, Dangel et al. 2020)

    g_{i,W} = sum_t d_{i,t} a_{i,t}^T [out, in],        g_{i,b} = sum_t d_{i,t} [out],

because l_i depends on row i only. With T = 1 the squares need no per-sample tensor:
sum_i g_{i,W}^2 = (d^2)^T (a^2) and ||g_{i,W}||^2 = ||d_i||^2 ||a_i||^2; with T > 1
each layer's [B, out, in] stack is built, squared and summed, one layer at a time.
Products with a direction V reduce to matmuls on the cached factors:
g_i^T v = sum_t d_{i,t}^T V a_{i,t} and sum_i u_i g_{i,W} = (u d)^T a.

The factors are valid when every trainable parameter is the weight or bias of an
``nn.Linear`` that runs exactly once per ``loss_fn`` call, on inputs whose dim 0 is the
batch, and samples do not interact (any model in eval mode that does not mix rows).
:func:`linear_param_map` checks the first statically, :func:`linear_factors` the rest
at run time and returns ``None`` (with the reason) when a check fails.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from uma_callbacks.core.batches import count_samples
from uma_callbacks.core.losses import LossFn


def linear_param_map(model: torch.nn.Module, params: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, str]] | None:
    """``{param name: (module name, "weight" | "bias")}`` when every parameter belongs to an ``nn.Linear``.

    Args:
        model: the model.
        params: ``{name: parameter}`` to differentiate.

    Returns:
        The map, or ``None`` when some parameter is not a weight/bias of exactly one
        ``nn.Linear`` (shared or tied parameters included).
    """
    owners: dict[int, list[tuple[str, str]]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, torch.nn.Linear):
            for kind in ("weight", "bias"):
                p = getattr(module, kind, None)
                if p is not None:
                    owners.setdefault(id(p), []).append((mod_name, kind))
    out = {}
    for name, p in params.items():
        found = owners.get(id(p), [])
        if len({m for m, _ in found}) != 1:
            return None
        out[name] = found[0]
    return out


@dataclass
class _Layer:
    a: torch.Tensor  # [B, T, in]
    d: torch.Tensor  # [B, T, out]
    weight: str | None  # param name of the weight, if trainable
    bias: str | None


class LinearFactors:
    """Per-sample gradients of a chunk, held as per-layer factors (a, d); see the module docstring.

    Attributes:
        losses: ``[B]`` per-sample losses (detached).
        n: B.
        names: parameter names, model order.
    """

    def __init__(self, losses: torch.Tensor, layers: list[_Layer], names: list[str]) -> None:
        self.losses = losses
        self.n = int(losses.shape[0])
        self.names = names
        self._layers = layers

    def nbytes(self) -> int:
        """Bytes held by the cached factors."""
        return sum(t.numel() * t.element_size() for layer in self._layers for t in (layer.a, layer.d))

    def square_stats(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``({name: sum_i g_{i,p}^2}, sq_norms [B, len(names)] float64 with ||g_{i,p}||^2)``."""
        sums: dict[str, torch.Tensor] = {}
        norms: dict[str, torch.Tensor] = {}
        for layer in self._layers:
            a, d = layer.a, layer.d
            if layer.weight is not None:
                if a.shape[1] == 1:
                    a2, d2 = a[:, 0].square(), d[:, 0].square()
                    sums[layer.weight] = d2.T @ a2
                    norms[layer.weight] = d2.sum(1).double() * a2.sum(1).double()
                else:
                    g = torch.bmm(d.transpose(1, 2), a)  # [B, out, in]
                    g.square_()
                    sums[layer.weight] = g.sum(0)
                    norms[layer.weight] = g.sum((1, 2)).double()
                    del g
            if layer.bias is not None:
                gb2 = d.sum(1).square()  # [B, out]
                sums[layer.bias] = gb2.sum(0)
                norms[layer.bias] = gb2.sum(1).double()
        return {n: sums[n] for n in self.names}, torch.stack([norms[n] for n in self.names], dim=1)

    def grad_sums(self) -> dict[str, torch.Tensor]:
        """``{name: sum_i g_{i,p}}``."""
        out: dict[str, torch.Tensor] = {}
        for layer in self._layers:
            if layer.weight is not None:
                out[layer.weight] = layer.d.flatten(0, 1).T @ layer.a.flatten(0, 1)
            if layer.bias is not None:
                out[layer.bias] = layer.d.sum((0, 1))
        return {n: out[n] for n in self.names}

    def dot(self, v: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``u [B]`` with u_i = g_i^T v, for ``v = {name: tensor shaped like the parameter}``."""
        u = torch.zeros(self.n, dtype=self.losses.dtype, device=self.losses.device)
        for layer in self._layers:
            if layer.weight is not None:
                av = layer.a @ v[layer.weight].T  # [B, T, out]
                u = u + (av * layer.d).sum((1, 2)).to(u.dtype)
            if layer.bias is not None:
                u = u + (layer.d.sum(1) @ v[layer.bias]).to(u.dtype)
        return u

    def weighted_sum(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: sum_i u_i g_{i,p}}`` for weights ``u [B]``."""
        out: dict[str, torch.Tensor] = {}
        for layer in self._layers:
            du = layer.d * u.to(layer.d.dtype)[:, None, None]
            if layer.weight is not None:
                out[layer.weight] = du.flatten(0, 1).T @ layer.a.flatten(0, 1)
            if layer.bias is not None:
                out[layer.bias] = du.sum((0, 1))
        return {n: out[n] for n in self.names}


def linear_factors(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batch: Any,
    param_map: Mapping[str, tuple[str, str]],
    verify_params: Mapping[str, torch.Tensor] | None = None,
) -> tuple[LinearFactors | None, str]:
    """One forward and one backward to the layer outputs; the factors of every linear layer.

    Args:
        model: the model.
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]``.
        batch: a chunk of B samples.
        param_map: from :func:`linear_param_map`.
        verify_params: when given (``{name: parameter}``), also take autograd's gradient of
            sum_i l_i and check that the factors sum to it (catches a parameter used
            outside its layer's forward); costs one weight-gradient pass.

    Returns:
        ``(factors, "")``, or ``(None, reason)`` when a run-time check fails (a layer
        ran other than once, its dim 0 is not the batch, the losses are not ``[B]``, or
        the verification fails).
    """
    n = count_samples(batch)
    modules = dict(model.named_modules(remove_duplicate=False))
    by_module: dict[str, dict[str, str]] = {}
    for pname, (mod_name, kind) in param_map.items():
        by_module.setdefault(mod_name, {})[kind] = pname
    records: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {m: [] for m in by_module}

    def hook_for(mod_name: str):
        def hook(_module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            records[mod_name].append((inputs[0], output))

        return hook

    handles = [modules[m].register_forward_hook(hook_for(m)) for m in by_module]
    try:
        with torch.enable_grad():
            losses = loss_fn(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    if losses.shape != (n,):
        return None, f"loss_fn returned shape {tuple(losses.shape)}, not [{n}]"
    for mod_name, calls in records.items():
        if len(calls) != 1:
            return None, f"module {mod_name!r} ran {len(calls)} times in one loss_fn call"
        a, y = calls[0]
        if a.dim() < 2 or a.shape[0] != n or y.shape[0] != n:
            return None, f"module {mod_name!r} input {tuple(a.shape)} has no batch dim of {n}"
    names_in_order = list(records)
    outputs = [records[m][0][1] for m in names_in_order]
    targets = [p for _, p in verify_params.items()] if verify_params is not None else []
    grads = torch.autograd.grad(losses.sum(), outputs + targets, allow_unused=True)
    grads, direct = grads[: len(outputs)], grads[len(outputs) :]
    layers = []
    for mod_name, y, d in zip(names_in_order, outputs, grads):
        a = records[mod_name][0][0].detach()
        d = torch.zeros_like(y) if d is None else d.detach()
        layers.append(
            _Layer(
                a=a.reshape(n, -1, a.shape[-1]),
                d=d.reshape(n, -1, d.shape[-1]),
                weight=by_module[mod_name].get("weight"),
                bias=by_module[mod_name].get("bias"),
            )
        )
    factors = LinearFactors(losses.detach(), layers, list(param_map))
    if verify_params is not None:
        summed = factors.grad_sums()
        for (name, p), g in zip(verify_params.items(), direct):
            g = torch.zeros_like(p) if g is None else g
            err = float((summed[name] - g).norm())
            if err > 1e-4 * float(g.norm()) + 1e-30 or not math.isfinite(err):
                return None, f"the factors' gradient of {name!r} differs from autograd's (used outside its layer?)"
    return factors, ""

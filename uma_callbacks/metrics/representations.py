r"""Representations: dead units, geometry, superposition and CKA drift of the layers' token states."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from uma_callbacks.core import seeds, validate
from uma_callbacks.core.activations import (
    Layer,
    TokenStates,
    capture_tokens,
    resolve_layers,
    state_bytes_estimate,
    weight_rows,
)
from uma_callbacks.linalg.weights import moved_weights
from uma_callbacks.metrics.base import ComputeContext, Cost, Metric, MetricResult
from uma_callbacks.metrics.time_cost import UnitCosts


# ---------------------------------------------------------------------- pure functions
def centered(x: torch.Tensor) -> torch.Tensor:
    """X - mean over tokens, ``[n, d]``."""
    return x - x.mean(dim=0, keepdim=True)


def covariance_spectrum(x: torch.Tensor) -> torch.Tensor:
    r"""Eigenvalues of the token covariance C = Xc^T Xc / (n - 1), descending.

    Computed on the smaller side: for n < d the non-zero eigenvalues of Xc^T Xc [d, d] are
    those of Xc Xc^T [n, n]. Returns the min(n, d) eigenvalues of that side.

    Args:
        x: token states ``[n, d]``, n >= 2.
    """
    xc = centered(x)
    small = xc.T @ xc if x.shape[1] <= x.shape[0] else xc @ xc.T
    return torch.linalg.eigvalsh(small / (x.shape[0] - 1)).flip(0)


def participation_ratio(x: torch.Tensor) -> float:
    r"""(sum l)^2 / sum l^2 over the covariance eigenvalues l = tr(C)^2 / ||C||_F^2.

    No eigendecomposition: tr(C) = ||Xc||_F^2 / (n - 1), and ||Xc^T Xc||_F = ||Xc Xc^T||_F
    (the smaller side is formed). NaN for constant states.

    Args:
        x: ``[n, d]``.
    """
    xc = centered(x)
    small = xc.T @ xc if x.shape[1] <= x.shape[0] else xc @ xc.T
    trace = float(torch.diagonal(small).sum())
    frob_sq = float((small * small).sum())
    return trace * trace / frob_sq if frob_sq > 0 else math.nan


def anisotropy(x: torch.Tensor) -> float:
    r"""Mean cosine between distinct tokens' states (Ethayarajh 2019).

    With unit rows u_i = x_i / ||x_i|| (0 for a zero state):
    (||sum_i u_i||^2 - sum_i ||u_i||^2) / (n (n - 1)), O(n d).

    Args:
        x: ``[n, d]``, n >= 2.
    """
    n = x.shape[0]
    u = _unit_rows(x)
    s = u.sum(dim=0)
    return float(((s * s).sum() - (u * u).sum()) / (n * (n - 1)))


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    norms = x.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, x / norms.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))


def superposition_interference(w: torch.Tensor) -> tuple[float, float]:
    r"""Superposition and interference of the hidden units W_i (rows of ``w [h, d]``).

    D_i = ||W_i||^2 / sum_j (W^_i . W_j)^2 (Elhage et al. 2022, "Toy Models of
    Superposition"; W^_i = W_i / ||W_i||), with sum_j (W^_i . W_j)^2 = W^_i^T (W^T W) W^_i,
    so only the [d, d] matrix W^T W is formed; superposition = h / sum_i D_i (1 when the
    rows are orthogonal; zero rows have D_i = 0). interference = mean over i != j of
    (W^_i . W^_j)^2 = (||W^^T W^||_F^2 - h') / (h (h - 1)) with h' the non-zero rows.

    Args:
        w: ``[h, d]``, h >= 2 (float64 for a float64 model, else float32).
    """
    w = w.to(torch.float64 if w.dtype == torch.float64 else torch.float32)
    h = w.shape[0]
    gram = w.T @ w
    u = _unit_rows(w)
    denom = ((u @ gram) * u).sum(dim=1)
    sq = (w * w).sum(dim=1)
    d_i = torch.where(denom > 0, sq / denom.clamp_min(torch.finfo(w.dtype).tiny), torch.zeros_like(sq))
    total = float(d_i.sum())
    unit_gram = u.T @ u
    pairs = float((unit_gram * unit_gram).sum()) - float((u * u).sum())
    return (h / total if total > 0 else math.nan), pairs / (h * (h - 1))


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    r"""Linear CKA (Kornblith et al. 2019) of states ``x [n, dx]`` and ``y [n, dy]`` of the same tokens.

    CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) = <Kx, Ky> / (||Kx|| ||Ky||)
    with centred Grams K = Xc Xc^T (the side with fewer entries is formed). 1 for
    identical states, and for y = s x Q with Q orthogonal, s != 0. NaN for constant states.
    """
    xc, yc = centered(x), centered(y)
    if x.shape[0] <= max(x.shape[1], y.shape[1]):
        kx, ky = xc @ xc.T, yc @ yc.T
        num, nx, ny = float((kx * ky).sum()), float(kx.norm()), float(ky.norm())
    else:
        num = float((yc.T @ xc).pow(2).sum())
        nx, ny = float((xc.T @ xc).norm()), float((yc.T @ yc).norm())
    return num / (nx * ny) if nx > 0 and ny > 0 else math.nan


def cka_matrix(states: Sequence[torch.Tensor]) -> np.ndarray:
    r"""Linear CKA of every pair of layers, ``[L, L]`` (symmetric, 1 on the diagonal).

    Token side (n <= every width): the centred Grams K_l [n, n], normalised once; feature
    side: ||X_l^T X_m||_F^2 over the normalising ||X_l^T X_l||_F.
    """
    count = len(states)
    out = np.full((count, count), math.nan)
    xs = [centered(s) for s in states]
    n = xs[0].shape[0] if xs else 0
    if xs and n <= min(x.shape[1] for x in xs):
        grams = []
        for x in xs:
            k = x @ x.T
            norm = float(k.norm())
            grams.append(k / norm if norm > 0 else None)
        for i in range(count):
            for j in range(i, count):
                gi, gj = grams[i], grams[j]
                if gi is not None and gj is not None:
                    out[i, j] = out[j, i] = float((gi * gj).sum())
        return out
    norms = [float((x.T @ x).norm()) for x in xs]
    for i in range(count):
        for j in range(i, count):
            if norms[i] > 0 and norms[j] > 0:
                out[i, j] = out[j, i] = float((xs[j].T @ xs[i]).pow(2).sum()) / (norms[i] * norms[j])
    return out


def dead_fraction(unit_max: torch.Tensor, threshold: float) -> float:
    r"""Share of units u with max_t |a_u(t)| <= threshold * max_{u, t} |a_u(t)|.

    Args:
        unit_max: ``[h]`` max |activation| of each unit over the probe's tokens.
        threshold: the relative threshold (``dead_threshold``).
    """
    top = float(unit_max.max())
    return float((unit_max <= threshold * top).double().mean())


# ---------------------------------------------------------------------- metric
class Representations(Metric):
    r"""Dead units, effective dimension, anisotropy, superposition and CKA drift per layer.

    Token states are captured by forward hooks (:mod:`uma_callbacks.core.activations`): the
    output of each transformer block (or of each named module) on at most ``max_tokens``
    non-padding probe tokens, a seeded sample that is the same at every checkpoint.
    Per layer i (scalars ``layers/<i>/...``):

    - ``dead_fraction``: share of the MLP's hidden units whose |activation| never exceeds
      ``dead_threshold`` x the layer's largest |activation| on any probe token (all
      non-padding tokens, not only the sample; a named module's own output units);
    - ``effective_dim``: participation ratio (sum l)^2 / sum l^2 of the eigenvalues l of the
      centred token covariance (:func:`participation_ratio`);
    - ``anisotropy``: mean cosine between distinct tokens' states (:func:`anisotropy`);
    - ``superposition``, ``interference``: from the rows of the MLP's read-in projection
      (gate, else up projection; a named module's own 2-D weight), see
      :func:`superposition_interference`;
    - ``cka_prev``, ``cka_first``: linear CKA of the block outputs against the previous and
      the first checkpoint on the same tokens: their states are computed by moving the
      weights in place to theirs (:func:`~uma_callbacks.linalg.weights.moved_weights`) and
      back, bit for bit. Absent (and ``meta["cka"]`` says why) before there is history.

    Arrays: ``cka_layers [L, L]``, linear CKA layer against layer. ``meta``: tokens kept
    and in the probe, the layer names, the eigen-side (``"features"`` when d <= n, else
    ``"tokens"``) of each layer.

    Memory (:meth:`memory_modes`): on the model's device, one chunk's forward, a saved copy
    of the weights and the earlier weights; on the host, the states of ``max_tokens``
    tokens for every layer (this checkpoint's, an earlier one's, the merge buffer, and the
    first and last checkpoint's kept for reuse) and the [min(n, d)]^2 Grams (token side
    for ``cka_layers`` when n <= d: one per layer).

    Cost: one forward that stops after the last block, plus one more per earlier
    checkpoint whose states are not kept (at most two; none from the third checkpoint of
    a run on, when the same object measured the previous and the first).

    Args:
        max_tokens: the most tokens sampled (>= 2).
        dead_threshold: relative threshold of a dead unit, in [0, 1).
        seed: the token-sampling seed.
        modules: module names to capture instead of the transformer blocks.
        chunk_size: samples per forward.
        timeout_seconds: stop between chunks past this time.

    Raises:
        ValueError: bad arguments (named), here; at compute time, a module name the model
            lacks, a probe without non-padding tokens, or fewer than 2 tokens.

    Example:
        >>> from tests.cases import qwen2_case
        >>> model, batches, _ = qwen2_case(torch.float64)
        >>> r = Representations(max_tokens=16).compute(model, batches)
        >>> r.arrays["cka_layers"].shape, r.meta["n_tokens_used"]
        ((2, 2), 16)
    """

    name = "representations"
    needs_grad = False
    needs_eager_attention = True
    history_needed = 1
    needs_first = True

    def __init__(
        self,
        max_tokens: int = 2048,
        dead_threshold: float = 0.01,
        seed: int = seeds.DEFAULT_SEED,
        modules: Sequence[str] | None = None,
        *,
        chunk_size: int | None = None,
        timeout_seconds: float | None = None,
    ) -> None:
        super().__init__(chunk_size=chunk_size, timeout_seconds=timeout_seconds)
        _check_common("Representations", max_tokens, seed, modules)
        validate.check_number("Representations.dead_threshold", dead_threshold, 0, 1, hi_open=True)
        self.max_tokens = max_tokens
        self.dead_threshold = float(dead_threshold)
        self.seed = seed
        self.modules = list(modules) if modules is not None else None
        #: {weights checksum: (layer names, token keys, states)} of the first and the last
        #: checkpoint measured (host memory), reused as earlier checkpoints' states
        self._kept: dict[tuple, tuple[list[str], torch.Tensor, list[torch.Tensor]]] = {}
        self._first_key: tuple | None = None

    def _remember(self, key: tuple, names: list[str], keys: torch.Tensor, states: list[torch.Tensor], first: bool) -> None:
        """Keep this checkpoint's states (and the first checkpoint's), drop the rest."""
        if first or self._first_key is None:
            self._first_key = key
        keep = {k: v for k, v in self._kept.items() if k == self._first_key}
        keep[key] = (names, keys, states)
        self._kept = keep

    def memory_modes(self) -> list[tuple[str, Cost]]:
        """One mode, on the model's device and on the host.

        On the model's device: a forward's activations per sample (A, measured
        with the graph kept, which covers the chunk's captured candidates of a no-grad
        forward), the saved and the earlier weights (2 P). On the host (the captured states
        live there): this checkpoint's and an earlier one's states plus the merge buffer, the
        two kept sets (first and last checkpoint), the layers' token-side Grams for
        ``cka_layers`` (L n^2 <= the bytes of two sets of states when n <= d), and three
        [min(n, d)]^2 float64 Grams.
        """
        tokens = self.max_tokens

        def host(n: int, itemsize: float, samples: int) -> int:
            side = min(tokens, int(2 * n**0.5))
            return state_bytes_estimate(n, tokens, 7.0) + 3 * side * side * 8

        return [("default", Cost(forward_only=True, param_copies=2.0, host_extra_bytes=host))]

    def time_cost(self, units: UnitCosts) -> float:
        """Forwards that keep the hidden states, and their statistics: about three forwards."""
        return 3 * units.forward

    def _compute(self, ctx: ComputeContext) -> MetricResult:
        layers = resolve_layers(ctx.model, self.modules, "Representations.modules")
        chunks = list(ctx.chunks())
        current = capture_tokens(
            ctx.model, chunks, layers, ctx.loss_fn, max_tokens=self.max_tokens, seed=self.seed,
            collective=ctx.collective, with_units=True, check_time=ctx.check_time,
        )
        if current.n < 2:
            raise ValueError(f"Representations needs at least 2 non-padding tokens; the probe has {current.n}")
        scalars: dict[str, float] = {}
        sides = []
        states = [current.states[f"layers/{i}"] for i in range(len(layers))]
        for i, (layer, x) in enumerate(zip(layers, states)):
            sides.append("features" if x.shape[1] <= x.shape[0] else "tokens")
            scalars.update(_layer_scalars(i, layer, x, current, self.dead_threshold))
        scalars.update(self._drift(ctx, layers, chunks, states, current.keys))
        ctx.meta.update(
            n_tokens_used=current.n, n_tokens_probe=current.n_tokens, layers=current.layer_names,
            eigen_side=sides, seed=self.seed,
        )
        return MetricResult(name=self.name, scalars=scalars, arrays={"cka_layers": cka_matrix(states)})

    def _drift(
        self, ctx: ComputeContext, layers: Sequence[Layer], chunks: Sequence[Any], states: Sequence[torch.Tensor],
        keys: torch.Tensor,
    ) -> dict[str, float]:
        """``layers/<i>/cka_prev`` and ``cka_first`` from the history's weights.

        The states of an earlier checkpoint are recomputed by moving the weights, unless
        this object measured that checkpoint itself (the last and the first checkpoint it
        measured are kept, keyed by a checksum of the weights, the tokens' keys and the
        layers): then they are reused, bit for bit what the recomputation would give.
        """
        prev = ctx.history.previous[0] if ctx.history.previous else None
        first = ctx.history.first
        names = [layer.name for layer in layers]
        own = _weights_checksum(dict(ctx.model.named_parameters()), ctx.model)
        out: dict[str, float] = {}
        earlier: dict[str, list[torch.Tensor]] = {}
        reused = []
        for label, state in (("prev", prev), ("first", first)):
            if state is None:
                continue
            if label == "first" and prev is not None and state.fingerprint == prev.fingerprint and state.step == prev.step:
                earlier["first"] = earlier["prev"]
                continue
            ctx.meta[f"cka_{label}_step"] = state.step
            cached = self._kept.get(_weights_checksum(state.weights, ctx.model))
            if cached is not None and cached[0] == names and torch.equal(cached[1], keys):
                earlier[label] = cached[2]
                reused.append(label)
                continue
            other = _states_with_weights(ctx, layers, chunks, state.weights, self.max_tokens, self.seed)
            earlier[label] = [other.states[f"layers/{i}"] for i in range(len(layers))]
        self._remember(own, names, keys, list(states), first is None and prev is None)
        if reused:
            ctx.meta["cka_reused"] = reused
        if prev is None and first is None:
            ctx.meta["cka"] = "no earlier checkpoint yet: cka_prev and cka_first start at the second checkpoint"
            return out
        for label, others in earlier.items():
            for i, (x, y) in enumerate(zip(states, others)):
                out[f"layers/{i}/cka_{label}"] = linear_cka(x, y)
        return out


def _layer_scalars(i: int, layer: Layer, x: torch.Tensor, tokens: TokenStates, threshold: float) -> dict[str, float]:
    out = {
        f"layers/{i}/effective_dim": participation_ratio(x),
        f"layers/{i}/anisotropy": anisotropy(x),
    }
    unit_max = tokens.unit_max.get(f"layers/{i}")
    if unit_max is not None and unit_max.numel():
        out[f"layers/{i}/dead_fraction"] = dead_fraction(unit_max, threshold)
    rows = weight_rows(layer.read_in)
    if rows is not None and rows.shape[0] >= 2:
        sup, inter = superposition_interference(rows)
        out[f"layers/{i}/superposition"] = sup
        out[f"layers/{i}/interference"] = inter
    return out


def _states_with_weights(
    ctx: ComputeContext, layers: Sequence[Layer], chunks: Sequence[Any], weights: Mapping[str, torch.Tensor],
    max_tokens: int, seed: int,
) -> TokenStates:
    """The layers' states on the same tokens with the model's weights set to ``weights``.

    The weights are set in place and restored bit for bit; parameters absent from
    ``weights`` keep their value.

    Raises:
        ValueError: ``weights`` matches none of the model's parameters (by name and shape).
    """
    named = [(n, p) for n, p in ctx.model.named_parameters() if n in weights and weights[n].shape == p.shape]
    if not named:
        raise ValueError("Representations: the earlier checkpoint's weights match none of the model's parameters")
    with moved_weights([p for _, p in named]) as mover:
        mover.set_lerp([weights[n].to(device=p.device, dtype=p.dtype) for n, p in named], 0.0)
        return capture_tokens(
            ctx.model, chunks, layers, ctx.loss_fn, max_tokens=max_tokens, seed=seed,
            collective=ctx.collective, check_time=ctx.check_time,
        )


def _weights_checksum(weights: Mapping[str, torch.Tensor], model: torch.nn.Module) -> tuple:
    """A cheap identity of the weights of ``model``'s parameters as given in ``weights``.

    Per tensor: its dtype, shape and two float64 sums (plain and position-weighted) of at
    most 4096 evenly strided entries.
    """
    out: list[tuple[Any, ...]] = []
    for name, p in model.named_parameters():
        w = weights.get(name)
        if w is None or w.shape != p.shape:
            out.append((name, None))
            continue
        flat = w.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)][:4096].to(torch.float64)
        ramp = torch.arange(1, sample.numel() + 1, dtype=torch.float64, device=sample.device)
        out.append((name, str(w.dtype), tuple(w.shape), float(sample.sum()), float((sample * ramp).sum())))
    return tuple(out)


def _check_common(owner: str, max_tokens: Any, seed: Any, modules: Any) -> None:
    """Validate the arguments both activation metrics share.

    Raises:
        ValueError: naming the field: ``max_tokens`` or ``seed`` out of range, or ``modules``
            neither ``None`` nor a non-empty list of module names.
    """
    validate.check_int(f"{owner}.max_tokens", max_tokens, 2, validate.MAX_TOKENS)  # >= 2: statistics between tokens
    validate.check_seed(f"{owner}.seed", seed)
    if modules is not None and (
        isinstance(modules, str) or not isinstance(modules, Sequence) or not modules
        or not all(isinstance(m, str) and m for m in modules)
    ):
        raise ValueError(f"{owner}.modules must be a non-empty list of module names or None; got {modules!r}")

r"""Information theory of the layers' token states: matrix-based Renyi entropy, MI, PID."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from uma_callbacks.core import seeds, validate
from uma_callbacks.core.activations import capture_tokens, resolve_layers, state_bytes_estimate
from uma_callbacks.metrics.base import ComputeContext, Cost, Metric, MetricResult
from uma_callbacks.metrics.representations import _check_common, _unit_rows
from uma_callbacks.metrics.time_cost import UnitCosts


# ---------------------------------------------------------------------- matrix-based entropy
def renyi_entropy(eigenvalues: torch.Tensor | np.ndarray, alpha: float) -> float:
    r"""S_alpha = log2(sum_i l_i^alpha) / (1 - alpha) in bits; alpha = 1: -sum_i l_i log2 l_i.

    Args:
        eigenvalues: of a unit-trace PSD matrix (rounding negatives are taken as 0).
        alpha: > 0.
    """
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64).clamp_min(0)
    lam = lam[lam > 0]
    if alpha == 1.0:
        return float(-(lam * torch.log2(lam)).sum())
    return float(torch.log2((lam**alpha).sum()) / (1.0 - alpha))


def _side_eigenvalues(u: torch.Tensor, trace: float) -> tuple[torch.Tensor, str]:
    """Eigenvalues of U U^T / trace from the smaller of U U^T [n, n] and U^T U [d, d]."""
    if u.shape[0] == 0 or trace <= 0:
        return torch.zeros(0, dtype=torch.float64), "features"
    if u.shape[1] <= u.shape[0]:
        return torch.linalg.eigvalsh(u.T @ u / trace), "features"
    return torch.linalg.eigvalsh(u @ u.T / trace), "tokens"


def gram_eigenvalues(x: torch.Tensor) -> tuple[torch.Tensor, str]:
    r"""Eigenvalues of A = K / tr K, K = U U^T the Gram of the unit-normalised rows of ``x [n, d]``.

    For a linear kernel the non-zero eigenvalues of U U^T [n, n] are those of U^T U [d, d];
    the smaller is decomposed. Returns ``(eigenvalues, side)``, side ``"features"`` or ``"tokens"``.
    """
    u = _unit_rows(x)
    return _side_eigenvalues(u, float((u * u).sum()))


def matrix_entropy(x: torch.Tensor, alpha: float = 1.0) -> float:
    """S_alpha(A) of :func:`gram_eigenvalues` (Giraldo, Rao & Principe 2014), bits."""
    return renyi_entropy(gram_eigenvalues(x)[0], alpha)


def joint_entropy(
    x: torch.Tensor, z: torch.Tensor, alpha: float = 1.0, z_gram: torch.Tensor | None = None
) -> tuple[float, str]:
    r"""S_alpha(A o B / tr(A o B)) of the unit-row Grams of ``x [n, dx]`` and ``z [n, dz]``.

    K_x o K_z is the Gram of the rows u_i (x) v_i (dx dz features): the smaller of n x n and
    (dx dz) x (dx dz) is decomposed. Returns ``(entropy, side)``.

    Args:
        x: ``[n, dx]``.
        z: ``[n, dz]``.
        alpha: Renyi order.
        z_gram: K_z = V V^T ``[n, n]`` when already formed (one input, many layers).
    """
    u = _unit_rows(x)
    if u.shape[1] * z.shape[1] < u.shape[0]:
        v = _unit_rows(z)
        rows = (u.unsqueeze(2) * v.unsqueeze(1)).reshape(u.shape[0], -1)
        lam, side = _side_eigenvalues(rows, float((rows * rows).sum()))
        return renyi_entropy(lam, alpha), side
    k = u @ u.T
    k.mul_(unit_gram(z) if z_gram is None else z_gram)
    trace = float(torch.diagonal(k).sum())
    if trace <= 0:
        return 0.0, "tokens"
    return renyi_entropy(torch.linalg.eigvalsh(k) / trace, alpha), "tokens"


def unit_gram(z: torch.Tensor) -> torch.Tensor:
    """V V^T ``[n, n]`` of the unit-normalised rows of ``z [n, d]``."""
    v = _unit_rows(z)
    return v @ v.T


def class_joint_entropy(x: torch.Tensor, labels: torch.Tensor, alpha: float = 1.0) -> float:
    r"""S_alpha(A o B / tr(A o B)) with B the one-hot Gram B_ij = [y_i = y_j] of ``labels [n]``.

    A o B is block diagonal over the classes and tr(A o B) = tr A, so its spectrum is the
    union over classes c of the eigenvalues of U_c U_c^T / tr K (each on its smaller side).
    """
    u = _unit_rows(x)
    trace = float((u * u).sum())
    if trace <= 0:
        return 0.0
    parts = []
    order = torch.argsort(labels, stable=True)
    _, counts = torch.unique_consecutive(labels[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    for size in torch.unique(counts).tolist():
        first = starts[counts == size]
        rows = u[order[first.unsqueeze(1) + torch.arange(size)]]  # [m, size, d]: the classes of this size
        if size == 1:
            parts.append((rows * rows).sum(dim=(1, 2)) / trace)
        elif size <= u.shape[1]:  # batched token-side Grams [m, size, size]
            parts.append(torch.linalg.eigvalsh(rows @ rows.transpose(1, 2)).reshape(-1) / trace)
        else:
            parts.append(torch.linalg.eigvalsh(rows.transpose(1, 2) @ rows).reshape(-1) / trace)
    return renyi_entropy(torch.cat([p.to(torch.float64) for p in parts]), alpha)


def class_entropy(labels: torch.Tensor, alpha: float = 1.0) -> float:
    """S_alpha(B / n) of the one-hot Gram: the Renyi entropy of the class frequencies, bits."""
    _, counts = torch.unique(labels, return_counts=True)
    return renyi_entropy(counts.double() / counts.sum(), alpha)


# ---------------------------------------------------------------------- PID
def pid_williams_beer(joint: np.ndarray) -> dict[str, float]:
    r"""Williams & Beer (2010) partial information decomposition of p(x1, x2, y), in bits.

    Specific information I(Y=y; S) = sum_s p(s|y) log2(p(s, y) / (p(s) p(y))); redundancy
    I_min = sum_y p(y) min(I(Y=y; X1), I(Y=y; X2)); unique_x = I(Y; X1) - I_min,
    unique_y = I(Y; X2) - I_min, synergy = I(Y; X1, X2) - I(Y; X1) - I(Y; X2) + I_min.
    The four parts sum to I(Y; X1, X2).

    Args:
        joint: ``[n1, n2, ny]`` non-negative (normalised here).

    Returns:
        ``{"redundancy", "unique_x", "unique_y", "synergy", "mi_joint"}``.

    Example:
        >>> xor = np.zeros((2, 2, 2))
        >>> for a in (0, 1):
        ...     for b in (0, 1):
        ...         xor[a, b, a ^ b] = 0.25
        >>> {k: round(v, 9) for k, v in pid_williams_beer(xor).items()}
        {'redundancy': 0.0, 'unique_x': 0.0, 'unique_y': 0.0, 'synergy': 1.0, 'mi_joint': 1.0}
    """
    p = np.asarray(joint, dtype=np.float64)
    p = p / p.sum()
    p_y = p.sum(axis=(0, 1))
    p_x1y = p.sum(axis=1)
    p_x2y = p.sum(axis=0)
    p_jy = p.reshape(-1, p.shape[2])
    spec = [_specific_information(q, p_y) for q in (p_x1y, p_x2y, p_jy)]
    mi = [float((p_y * s).sum()) for s in spec]
    red = float((p_y * np.minimum(spec[0], spec[1])).sum())
    return {
        "redundancy": red,
        "unique_x": mi[0] - red,
        "unique_y": mi[1] - red,
        "synergy": mi[2] - mi[0] - mi[1] + red,
        "mi_joint": mi[2],
    }


def _specific_information(p_sy: np.ndarray, p_y: np.ndarray) -> np.ndarray:
    """``[ny]`` I(Y=y; S) from p(s, y) ``[ns, ny]``."""
    p_s = p_sy.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(p_sy > 0, p_sy / (p_s * p_y[None, :]), 1.0)
        terms = np.where(p_sy > 0, p_sy * np.log2(ratio), 0.0)
        return np.where(p_y > 0, terms.sum(axis=0) / np.where(p_y > 0, p_y, 1.0), 0.0)


def kmeans(points: np.ndarray, k: int, seed: int, max_iter: int = 100) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding (``np.random.default_rng(seed)``); labels ``[n]``."""
    rng = np.random.default_rng(seed)
    n = points.shape[0]
    k = min(k, n)
    centres = [points[rng.integers(n)]]
    for _ in range(1, k):
        d2 = np.min(((points[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1), axis=1)
        total = d2.sum()
        centres.append(points[rng.choice(n, p=d2 / total)] if total > 0 else points[rng.integers(n)])
    c = np.asarray(centres)
    labels = np.full(n, -1)
    sq = (points * points).sum(axis=1, keepdims=True)
    for _ in range(max_iter):
        new = (sq - 2.0 * points @ c.T + (c * c).sum(axis=1)[None, :]).argmin(axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
        counts = np.bincount(labels, minlength=k)
        sums = np.zeros_like(c)
        np.add.at(sums, labels, points)
        filled = counts > 0
        c[filled] = sums[filled] / counts[filled, None]
    return labels


def discretise_states(x: torch.Tensor, bins: int, components: int, seed: int) -> np.ndarray:
    """Cluster labels ``[n]`` of the centred states ``x [n, d]``.

    Seeded k-means (``bins`` clusters) on the top ``components`` principal components.
    """
    xc = (x - x.mean(dim=0, keepdim=True)).double()
    k = min(components, *xc.shape)
    if xc.shape[1] <= xc.shape[0]:  # principal axes: top eigenvectors of Xc^T Xc [d, d]
        _, vecs = torch.linalg.eigh(xc.T @ xc)
        scores = xc @ vecs[:, -k:].flip(1)
    else:  # scores directly: top eigenvectors of Xc Xc^T [n, n], scaled by sqrt(eigenvalue)
        vals, vecs = torch.linalg.eigh(xc @ xc.T)
        scores = vecs[:, -k:].flip(1) * vals[-k:].flip(0).clamp_min(0).sqrt()
    return kmeans(scores.numpy(), bins, seed)


def target_classes(next_ids: torch.Tensor, bins: int) -> np.ndarray:
    """``[n]``: the ``bins - 1`` most frequent next tokens (ties: lower id) get 0..bins-2, the rest bins-1."""
    ids, counts = torch.unique(next_ids, return_counts=True)
    order = sorted(range(ids.numel()), key=lambda j: (-int(counts[j]), int(ids[j])))
    lookup = {int(ids[j]): rank for rank, j in enumerate(order[: bins - 1])}
    return np.array([lookup.get(int(t), bins - 1) for t in next_ids.tolist()])


def joint_counts(a: np.ndarray, b: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Histogram ``[max a + 1, max b + 1, max y + 1]`` of label triples."""
    out = np.zeros((a.max() + 1, b.max() + 1, y.max() + 1))
    np.add.at(out, (a, b, y), 1.0)
    return out


# ---------------------------------------------------------------------- metric
class InformationTheory(Metric):
    r"""Matrix-based entropy and mutual information per layer, output entropy, and a PID.

    Token states as in :class:`~uma_callbacks.metrics.representations.Representations`:
    block outputs (or named modules) on at most ``max_tokens`` seeded non-padding tokens.
    With U the unit-normalised states of layer i, A = U U^T / tr(U U^T) (Giraldo, Rao &
    Principe 2014), in bits:

    - ``layers/<i>/entropy`` = S_alpha(A) = log2(sum l^alpha) / (1 - alpha) (alpha = 1: von
      Neumann), eigenvalues on the smaller side (U^T U [d, d] when d <= n);
    - ``layers/<i>/mi_input`` = S(A) + S(B) - S(A o B / tr(A o B)), B from the first layer's
      input (the token embeddings of a transformer), on the first ``mi_tokens`` of the
      sampled tokens (all three terms on those; the joint needs an n x n eigendecomposition
      whenever dx dz >= n, O(n^3), while everything else is linear in n);
    - ``layers/<i>/mi_next_token``: the same with B_jk = [y_j = y_k], y the next token (-1
      at a sequence's end), exact through the block structure of A o B
      (:func:`class_joint_entropy`); journals before this name call it ``mi_target``;
    - ``layers/<i>/mi_label``: the same with y the class label of the token's sample, when
      the probe has class labels (``labels`` of shape [batch]: a classification head);
    - ``output_entropy``: mean entropy (nats) of the predictive distribution over all
      non-padding tokens of the probe;
    - ``pid/redundancy``, ``pid/unique_x``, ``pid/unique_y``, ``pid/synergy``: Williams-Beer
      PID (:func:`pid_williams_beer`) of X1, X2 = layers ``pid_layers`` discretised by seeded
      k-means (``pid_bins`` clusters on their top ``pid_components`` principal components)
      about Y = the ``pid_bins - 1`` most frequent next tokens and the rest; ``pid/mi_joint``
      = I(Y; X1, X2), their sum.

    Arrays: ``information_plane [L, 2]``: (mi_input, mi_next_token) per layer. ``meta``: tokens
    used (``n_tokens_used``, ``n_tokens_mi_input``) and in the probe, each layer's
    eigen-side for S(A) (``eigen_side``) and for the joint with the input (``joint_input_side``).
    ``mi_next_token`` and the PID need ``input_ids``; without them they are absent (``meta``).

    Args:
        alpha: Renyi order, > 0.
        max_tokens: the most tokens sampled (>= 2).
        seed: the token-sampling and k-means seed.
        mi_tokens: ``mi_input`` uses the first ``mi_tokens`` sampled tokens in key order (a
            uniform subsample of the sample): its n x n Hadamard spectrum costs O(n^3).
        pid_bins: clusters per source and target classes (>= 2).
        pid_components: principal components clustered (>= 1).
        pid_layers: the two layers (indices; negative from the end) of the PID.
        modules: module names to capture instead of the transformer blocks.
        chunk_size: samples per forward.
        timeout_seconds: stop between chunks past this time.

    Raises:
        ValueError: bad arguments (named), here; at compute time, a module name the model
            lacks, a PID layer out of range, a probe without non-padding tokens.

    Example:
        >>> from tests.cases import qwen2_case
        >>> model, batches, _ = qwen2_case(torch.float64)
        >>> r = InformationTheory(max_tokens=32).compute(model, batches)
        >>> sorted(k for k in r.scalars if k.startswith("pid/"))
        ['pid/mi_joint', 'pid/redundancy', 'pid/synergy', 'pid/unique_x', 'pid/unique_y']
    """

    name = "information"
    needs_grad = False
    needs_eager_attention = True

    def __init__(
        self,
        alpha: float = 1.0,
        max_tokens: int = 2048,
        seed: int = seeds.DEFAULT_SEED,
        mi_tokens: int = 512,
        pid_bins: int = 4,
        pid_components: int = 4,
        pid_layers: Sequence[int] = (0, -1),
        modules: Sequence[str] | None = None,
        *,
        chunk_size: int | None = None,
        timeout_seconds: float | None = None,
    ) -> None:
        super().__init__(chunk_size=chunk_size, timeout_seconds=timeout_seconds)
        _check_common("InformationTheory", max_tokens, seed, modules)
        validate.check_number("InformationTheory.alpha", alpha, 0, 1000, lo_open=True)
        validate.check_int("InformationTheory.mi_tokens", mi_tokens, 2, validate.MAX_TOKENS)
        validate.check_int("InformationTheory.pid_bins", pid_bins, 2, 1024)
        validate.check_int("InformationTheory.pid_components", pid_components, 1, 1024)
        if isinstance(pid_layers, str) or not isinstance(pid_layers, Sequence) or len(pid_layers) != 2:
            raise ValueError(f"InformationTheory.pid_layers must be two layer indices; got {pid_layers!r}")
        for i in pid_layers:
            validate.check_int("InformationTheory.pid_layers", i, -100_000, 100_000)
        self.alpha = float(alpha)
        self.max_tokens = max_tokens
        self.seed = seed
        self.mi_tokens = mi_tokens
        self.pid_bins = pid_bins
        self.pid_components = pid_components
        self.pid_layers = [int(i) for i in pid_layers]
        self.modules = list(modules) if modules is not None else None

    def memory_modes(self) -> list[tuple[str, Cost]]:
        """One mode, on the model's device and on the host.

        On the model's device: a forward's activations per sample (A, as for
        Representations). On the host (the captured states live there): the token states
        and the merge buffer, and three float64 square matrices (a Gram or the Hadamard
        product, eigvalsh's copy and workspace) of side max_tokens or mi_tokens.
        """
        tokens, side = self.max_tokens, max(self.max_tokens, self.mi_tokens)

        def host(n: int, itemsize: float, samples: int) -> int:
            return state_bytes_estimate(n, tokens, 2.0) + 3 * min(side, tokens) ** 2 * 8

        return [("default", Cost(forward_only=True, host_extra_bytes=host))]

    def time_cost(self, units: UnitCosts) -> float:
        """Forwards that keep the hidden states, and their estimators: about three forwards."""
        return 3 * units.forward

    def _compute(self, ctx: ComputeContext) -> MetricResult:
        layers = resolve_layers(ctx.model, self.modules, "InformationTheory.modules")
        count = len(layers)
        pid_index = []
        for i in self.pid_layers:
            if not -count <= i < count:
                raise ValueError(f"InformationTheory.pid_layers index {i} is out of range for {count} layers")
            pid_index.append(i % count)
        sums = torch.zeros(2, dtype=torch.float64)  # entropy sum (nats), tokens

        def on_output(batch: Any, logits: torch.Tensor, mask: torch.Tensor) -> None:
            sums.add_(_entropy_sums(logits, mask))

        tokens = capture_tokens(
            ctx.model, list(ctx.chunks()), layers, ctx.loss_fn, max_tokens=self.max_tokens, seed=self.seed,
            collective=ctx.collective, with_input=True, with_next=True, on_output=on_output, check_time=ctx.check_time,
            with_label=True,
        )
        if tokens.n < 2:
            raise ValueError(f"InformationTheory needs at least 2 non-padding tokens; the probe has {tokens.n}")
        ctx.collective.sum_([sums])
        scalars: dict[str, float] = {}
        if sums[1] > 0:
            scalars["output_entropy"] = float(sums[0] / sums[1])
        z = tokens.states.get("input")
        nxt = tokens.states.get("next")
        label = tokens.states.get("label")
        s_label = class_entropy(label, self.alpha) if label is not None else math.nan
        m = min(tokens.n, self.mi_tokens)  # mi_input on the first m tokens in key order: a uniform subsample
        zm = z[:m] if z is not None else None
        s_input = matrix_entropy(zm, self.alpha) if zm is not None else math.nan
        s_target = class_entropy(nxt, self.alpha) if nxt is not None else math.nan
        plane = np.full((count, 2), math.nan)
        sides, joint_sides = [], []
        z_gram = unit_gram(zm) if zm is not None and m <= x_width(tokens.states, count) * zm.shape[1] else None
        for i in range(count):
            x = tokens.states[f"layers/{i}"]
            lam, side = gram_eigenvalues(x)
            s_x = renyi_entropy(lam, self.alpha)
            sides.append(side)
            scalars[f"layers/{i}/entropy"] = s_x
            if zm is not None:
                s_joint, joint_side = joint_entropy(x[:m], zm, self.alpha, z_gram)
                joint_sides.append(joint_side)
                s_xm = s_x if m == tokens.n else matrix_entropy(x[:m], self.alpha)
                plane[i, 0] = scalars[f"layers/{i}/mi_input"] = s_xm + s_input - s_joint
            if nxt is not None:
                joint = class_joint_entropy(x, nxt, self.alpha)
                plane[i, 1] = scalars[f"layers/{i}/mi_next_token"] = s_x + s_target - joint
            if label is not None:
                scalars[f"layers/{i}/mi_label"] = s_x + s_label - class_joint_entropy(x, label, self.alpha)
            ctx.check_time(layers_done=i + 1)
        if nxt is not None:
            scalars.update(self._pid(tokens.states, pid_index, nxt))
        else:
            ctx.meta["target"] = "no input_ids in the probe: mi_next_token and the PID need next tokens"
        if label is None:
            ctx.meta["label"] = "no class labels ([batch] integer labels) in the probe: no mi_label"
        ctx.meta.update(
            n_tokens_used=tokens.n, n_tokens_probe=tokens.n_tokens, n_tokens_mi_input=m, layers=tokens.layer_names,
            eigen_side=sides, joint_input_side=joint_sides, pid_layers=pid_index, alpha=self.alpha,
        )
        return MetricResult(name=self.name, scalars=scalars, arrays={"information_plane": plane})

    def _pid(self, states: dict[str, torch.Tensor], index: Sequence[int], nxt: torch.Tensor) -> dict[str, float]:
        a = discretise_states(states[f"layers/{index[0]}"], self.pid_bins, self.pid_components, self.seed)
        b = discretise_states(states[f"layers/{index[1]}"], self.pid_bins, self.pid_components, self.seed + 1)
        y = target_classes(nxt, self.pid_bins)
        return {f"pid/{k}": v for k, v in pid_williams_beer(joint_counts(a, b, y)).items()}


def x_width(states: dict[str, torch.Tensor], count: int) -> int:
    """The smallest width among the layers' states (decides whether an n x n joint is formed)."""
    return min(states[f"layers/{i}"].shape[1] for i in range(count))


def _entropy_sums(logits: torch.Tensor, mask: torch.Tensor, block: int = 1 << 21) -> torch.Tensor:
    """``[2]``: sum over non-padding tokens of the predictive entropy (nats), and their count.

    The non-padding rows are taken a block of about ``block`` logits at a time, so the
    temporaries (log-probabilities, probabilities) stay small beside the logits.
    """
    logits = logits.detach()
    rows = logits.reshape(-1, logits.shape[-1])  # a view for contiguous logits
    keep = None
    if logits.dim() == 3 and tuple(logits.shape[:2]) == tuple(mask.shape):
        keep = mask.to(logits.device).reshape(-1)
    total, count = torch.zeros((), dtype=torch.float64), 0
    step = max(1, block // max(1, rows.shape[-1]))
    for start in range(0, rows.shape[0], step):
        part = rows[start : start + step]
        if keep is not None:
            part = part[keep[start : start + step]]
        logp = torch.log_softmax(part if part.dtype == torch.float64 else part.float(), dim=-1)
        total += (-(logp.exp() * logp).sum(-1)).double().sum().cpu()
        count += part.shape[0]
    return torch.stack([total, torch.tensor(float(count), dtype=torch.float64)])

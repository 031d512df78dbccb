r"""Weight spectra: the singular values of every 2-D weight, their power-law exponent and ranks (no probe)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from uma_callbacks.core import validate
from uma_callbacks.core.attention_weights import find_attention_layers
from uma_callbacks.metrics.base import ComputeContext, Cost, Metric, MetricResult
from uma_callbacks.metrics.time_cost import UnitCosts

#: Eigenvalues at or below this are left out of the power-law fit (WeightWatcher's ``EVALS_THRESH``).
EVALS_THRESHOLD = 1e-5
#: Fewest eigenvalues above the threshold for a power-law fit (below it WeightWatcher switches
#: to a small-sample objective, and the fit says little).
MIN_EVALS = 20
#: Largest matrix (entries) whose singular values are computed by default: 2**27 entries are
#: 1 GiB in float64 (GPT-2's 50257 x 768 embedding is 2**25.2).
MAX_ENTRIES = 1 << 27
#: Per-matrix values, in the order of the result's arrays.
FIELDS = ("alpha", "alpha_hat", "xmin", "ks_distance", "n_tail", "stable_rank", "spectral_norm", "mp_softrank")


@dataclass(frozen=True)
class PowerLawFit:
    """A power law p(lambda) ~ lambda^-alpha fitted to the tail lambda >= xmin of a spectrum.

    Attributes:
        alpha: the maximum-likelihood exponent on the tail.
        xmin: where the tail starts (an eigenvalue).
        ks_distance: the Kolmogorov-Smirnov distance between the tail's empirical CDF and
            the fitted one (what ``xmin`` minimises).
        sigma: the exponent's standard error, (alpha - 1) / sqrt(n_tail).
        n_tail: eigenvalues in the tail.
    """

    alpha: float
    xmin: float
    ks_distance: float
    sigma: float
    n_tail: int


def fit_power_law(evals: np.ndarray, threshold: float = EVALS_THRESHOLD, min_evals: int = MIN_EVALS) -> PowerLawFit | None:
    r"""The power-law fit of WeightWatcher 0.7.7 (Clauset, Shalizi & Newman 2009, xmin by KS).

    With x_1 <= ... <= x_K the eigenvalues above ``threshold``, for each candidate
    xmin = x_i (i < K), n = K - i + 1 tail points:

    - alpha_i = 1 + n / sum_{j >= i} ln(x_j / x_i) (the continuous MLE);
    - D_i = max_{j >= i} | 1 - (x_j / x_i)^{1 - alpha_i} - (j - i) / n | (fitted CDF against
      the empirical one, 0, 1/n, ..., (n-1)/n), 1 when alpha_i <= 1;

    and the fit is the first i with the smallest D_i.

    Args:
        evals: the eigenvalues [K'] (any order).
        threshold: the eigenvalues kept are those above it.
        min_evals: fewest kept eigenvalues to fit (``None`` is returned below it).

    Returns:
        The :class:`PowerLawFit`, or ``None`` when too few eigenvalues pass the threshold.

    Example:
        >>> x = (1.0 - (np.arange(1000) + 0.5) / 1000) ** (-1.0 / 1.5)  # quantiles of alpha = 2.5, xmin = 1
        >>> fit = fit_power_law(x)
        >>> round(fit.alpha, 2), fit.n_tail
        (2.5, 1000)
    """
    values = np.asarray(evals, dtype=np.float64).reshape(-1)
    data = np.sort(values[values > threshold])
    count = data.size
    if count < max(2, min_evals):
        return None
    log = np.log(data)
    best_i, best_d, best_alpha = 0, math.inf, math.nan
    alphas = np.full(count - 1, math.nan)
    for i in range(count - 1):
        n = count - i
        spread = float(np.sum(log[i:])) - n * log[i]
        alpha = 1.0 + n / spread if spread > 0 else math.inf
        alphas[i] = alpha
        d = 1.0
        if 1.0 < alpha < math.inf:
            d = float(np.max(np.abs(1.0 - (data[i:] / data[i]) ** (1.0 - alpha) - np.arange(n) / n)))
        if d < best_d:
            best_i, best_d, best_alpha = i, d, alpha
    n_tail = count - best_i
    return PowerLawFit(
        alpha=float(best_alpha),
        xmin=float(data[best_i]),
        ks_distance=float(best_d),
        sigma=float((best_alpha - 1.0) / math.sqrt(n_tail)),
        n_tail=int(n_tail),
    )


def spectrum_values(singular_values: np.ndarray, shape: tuple[int, int], fit: PowerLawFit | None) -> dict[str, float]:
    r"""The per-matrix values of :class:`WeightSpectra` from a matrix's singular values.

    With W [N, M] (N >= M after transposing), singular values s_1 >= ... >= s_M and
    eigenvalues lambda_i = s_i^2 of W^T W (not divided by N, as WeightWatcher):

    - ``spectral_norm`` = s_1 = ||W||_2 (WeightWatcher's ``spectral_norm`` is lambda_max = s_1^2);
    - ``stable_rank`` = ||W||_F^2 / ||W||_2^2 = sum_i lambda_i / lambda_max;
    - ``mp_softrank`` = lambda_+ / lambda_max, lambda_+ = sigma^2 (sqrt(N) + sqrt(M))^2 the
      Marchenko-Pastur bulk edge of an N x M matrix of i.i.d. entries of variance
      sigma^2 = ||W||_F^2 / (N M) (Martin & Mahoney 2018; WeightWatcher fits sigma to the
      bulk by a kernel density instead): about 1 for a random matrix, small when a few
      large directions stand out of the bulk;
    - from the fit: ``alpha``, ``alpha_hat`` = alpha log10(lambda_max) (WeightWatcher's
      ``alpha_weighted``), ``xmin``, ``ks_distance``, ``n_tail`` (NaN without a fit).

    Args:
        singular_values: s [M] in float64 (any order).
        shape: (N, M) of the matrix (either order).
        fit: :func:`fit_power_law` of s^2, or ``None``.

    Returns:
        ``{field: value}`` for every name in :data:`FIELDS`.
    """
    s = np.asarray(singular_values, dtype=np.float64)
    lam = s * s
    lam_max = float(lam.max()) if lam.size else 0.0
    frob = float(lam.sum())
    n, m = max(shape), min(shape)
    sigma2 = frob / (n * m) if n * m else 0.0
    edge = sigma2 * (math.sqrt(n) + math.sqrt(m)) ** 2
    out = {
        "spectral_norm": math.sqrt(lam_max),
        "stable_rank": frob / lam_max if lam_max > 0 else math.nan,
        "mp_softrank": edge / lam_max if lam_max > 0 else math.nan,
        "alpha": math.nan,
        "alpha_hat": math.nan,
        "xmin": math.nan,
        "ks_distance": math.nan,
        "n_tail": math.nan,
    }
    if fit is not None and lam_max > 0:
        out.update(
            alpha=fit.alpha,
            alpha_hat=fit.alpha * math.log10(lam_max),
            xmin=fit.xmin,
            ks_distance=fit.ks_distance,
            n_tail=float(fit.n_tail),
        )
    return out


def weight_matrices(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, matrix)`` for every 2-D weight of ``model``, a fused QKV split into its Q, K and V blocks.

    Every parameter with two dimensions is one matrix named after its module (tied
    parameters once). GPT-2's ``c_attn`` (``Conv1D`` [d, 3 d]) is split into its column
    blocks ``<module>.q``, ``<module>.k``, ``<module>.v``, each the [d, d] matrix that a
    model with separate projections holds (:mod:`~uma_callbacks.core.attention_weights`
    finds it). The tensors are the model's own (views), not copies.

    Args:
        model: any module.

    Yields:
        ``(name, tensor [rows, cols])``.
    """
    fused = {}
    try:
        layers = find_attention_layers(model)
    except ValueError:  # a head count it cannot read: nothing is split
        layers = []
    for layer in layers:
        if layer.layout == "gpt2":
            c_attn: Any = layer.module.c_attn  # GPT-2's fused QKV projection (a Conv1D)
            fused[id(c_attn.weight)] = f"{layer.name}.c_attn"
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if p.ndim != 2 or id(p) in seen:
            continue
        seen.add(id(p))
        module = name.rpartition(".")[0] or name
        if id(p) in fused and p.shape[1] == 3 * p.shape[0]:
            d = p.shape[0]
            for i, part in enumerate("qkv"):
                yield f"{module}.{part}", p[:, i * d : (i + 1) * d]
        else:
            yield module, p


class WeightSpectra(Metric):
    r"""Heavy-tailed self-regularisation diagnostics of every 2-D weight (Martin & Mahoney 2021), from the weights only.

    For each matrix W [N, M] of :func:`weight_matrices` (fused QKV split into Q, K, V):
    s = ``torch.linalg.svdvals`` of W in float64 on the CPU, lambda = s^2 the empirical
    spectral density of W^T W, then :func:`spectrum_values`: the power-law exponent alpha of
    the ESD's tail (:func:`fit_power_law`: Clauset et al. 2009 with xmin chosen by the
    Kolmogorov-Smirnov distance, as WeightWatcher 0.7.7 fits it), alpha_hat = alpha
    log10(lambda_max), the stable rank, the spectral norm and the Marchenko-Pastur soft rank.
    Well-trained layers have alpha in about [2, 6]; alpha < 2 is read as over-fitted, > 6
    as under-trained.

    Scalars (K matrices, k = those with a fit, i.e. at least ``min_evals`` eigenvalues above
    :data:`EVALS_THRESHOLD`):

    - ``layers/<matrix>/alpha``, ``.../alpha_hat`` (fitted matrices), ``.../stable_rank``,
      ``.../spectral_norm``, ``.../mp_softrank``;
    - ``alpha_mean``, ``alpha_min``, ``alpha_max``, ``alpha_hat_mean`` over the k fits
      (WeightWatcher's model quality is ``alpha_hat_mean``); ``stable_rank_mean``,
      ``mp_softrank_mean`` over the K; ``spectral_norm_max``; ``n_matrices`` = K,
      ``n_fitted`` = k.

    Arrays: one value per matrix [K] in the order of ``meta["matrices"]`` for each name in
    :data:`FIELDS` (NaN where there is no fit); ``esd_min_alpha`` and ``esd_max_alpha``: the
    eigenvalues (ascending) of the matrices with the smallest and the largest alpha, for the
    log-log ESD figure (``meta["esd"]`` names them, with their alpha and xmin).

    Memory: one matrix at a time, in float64 on the host (the copy and LAPACK's work, about
    3 x 8 bytes per entry); a matrix of more than ``max_entries`` entries is left out and
    listed in ``meta["too_large"]``. No probe pass: it runs in a backfill without data.
    A sharded model (FSDP2) is skipped (the full matrices are not on one rank).

    Args:
        min_evals: fewest eigenvalues above the threshold for a power-law fit (>= 2).
        max_entries: the largest matrix whose spectrum is computed.
        chunk_size: unused (no probe); accepted for the common interface.
        timeout_seconds: stop between matrices past this time.

    Raises:
        ValueError: ``min_evals`` or ``max_entries`` out of range.

    Example:
        >>> torch.manual_seed(0) is not None
        True
        >>> lin = torch.nn.Linear(60, 40, bias=False)
        >>> r = WeightSpectra().compute(lin, [torch.zeros(1)], lambda m, b: b)  # the probe is not used
        >>> r.meta["matrices"], r.scalars["n_fitted"]
        (['weight'], 1.0)
        >>> s = torch.linalg.svdvals(lin.weight.detach().double())
        >>> abs(r.scalars["stable_rank_mean"] - float((s**2).sum() / s.max() ** 2)) < 1e-12
        True
    """

    name = "weight_spectra"
    needs_grad = False
    #: reads no probe: a backfill runs it without one (a one-token placeholder; see ``triggers/backfill.py``)
    needs_probe = False

    def __init__(
        self,
        min_evals: int = MIN_EVALS,
        max_entries: int = MAX_ENTRIES,
        *,
        chunk_size: int | None = None,
        timeout_seconds: float | None = None,
    ) -> None:
        super().__init__(chunk_size=chunk_size, timeout_seconds=timeout_seconds)
        validate.check_int("WeightSpectra.min_evals", min_evals, 2, 10**9)
        validate.check_int("WeightSpectra.max_entries", max_entries, 1, 1 << 40)
        self.min_evals = min_evals
        self.max_entries = max_entries

    def memory_modes(self) -> list[tuple[str, Cost]]:
        """One mode: host bytes of the largest matrix in float64, three times (copy and SVD work)."""
        cap = self.max_entries
        return [("default", Cost(host_extra_bytes=lambda n, _w, _s: 24 * min(n, cap)))]

    def time_cost(self, units: UnitCosts) -> float:
        """Weights only, no pass over the probe: a rough half forward (the suite's calibration corrects it)."""
        return 0.5 * units.forward

    def _compute(self, ctx: ComputeContext) -> MetricResult:
        names: list[str] = []
        rows: list[dict[str, float]] = []
        spectra: list[np.ndarray] = []
        too_large: list[str] = []
        for name, matrix in weight_matrices(ctx.model):
            if matrix.numel() > self.max_entries:
                too_large.append(name)
                continue
            with torch.no_grad():
                s = torch.linalg.svdvals(matrix.detach().to(device="cpu", dtype=torch.float64)).numpy()
            lam = np.sort(s * s)
            fit = fit_power_law(lam, min_evals=self.min_evals)
            names.append(name)
            rows.append(spectrum_values(s, (int(matrix.shape[0]), int(matrix.shape[1])), fit))
            spectra.append(lam)
            ctx.check_time(matrices_done=len(names))
        if not names:
            raise ValueError(
                "WeightSpectra: no 2-D weight to measure"
                + (f" within max_entries={self.max_entries} (too large: {too_large[:5]})" if too_large else "")
            )
        ctx.meta.update(matrices=names, too_large=too_large, eval_threshold=EVALS_THRESHOLD)
        return self._result(names, rows, spectra, ctx.meta)

    def _result(
        self, names: list[str], rows: list[dict[str, float]], spectra: list[np.ndarray], meta: dict[str, Any]
    ) -> MetricResult:
        arrays = {f: np.array([row[f] for row in rows], dtype=np.float64) for f in FIELDS}
        scalars: dict[str, float] = {}
        for name, row in zip(names, rows):
            for f in ("alpha", "alpha_hat", "stable_rank", "spectral_norm", "mp_softrank"):
                if math.isfinite(row[f]):
                    scalars[f"layers/{name}/{f}"] = row[f]
        alpha = arrays["alpha"]
        fitted = np.flatnonzero(np.isfinite(alpha))
        scalars["n_matrices"] = float(len(names))
        scalars["n_fitted"] = float(fitted.size)
        scalars["spectral_norm_max"] = float(np.nanmax(arrays["spectral_norm"]))
        for f in ("stable_rank", "mp_softrank"):
            if np.isfinite(arrays[f]).any():
                scalars[f"{f}_mean"] = float(np.nanmean(arrays[f]))
        if fitted.size:
            scalars.update(
                alpha_mean=float(alpha[fitted].mean()),
                alpha_min=float(alpha[fitted].min()),
                alpha_max=float(alpha[fitted].max()),
                alpha_hat_mean=float(arrays["alpha_hat"][fitted].mean()),
            )
            lo, hi = int(fitted[np.argmin(alpha[fitted])]), int(fitted[np.argmax(alpha[fitted])])
            arrays["esd_min_alpha"], arrays["esd_max_alpha"] = spectra[lo], spectra[hi]
            meta["esd"] = {
                key: {"matrix": names[i], "alpha": rows[i]["alpha"], "xmin": rows[i]["xmin"]}
                for key, i in (("esd_min_alpha", lo), ("esd_max_alpha", hi))
            }
        return MetricResult(name=self.name, scalars=scalars, arrays=arrays)

r"""Per-sample probe losses and gradient norms at each checkpoint, and TracIn self-influence across them.

For the N probe samples with losses l_i(theta) and gradients g_i = nabla_theta l_i, at the
checkpoint theta_t measured now:

- ``losses`` [N] = l_i(theta_t) and ``grad_norms`` [N] = ||g_i(theta_t)||, both from one
  ordinary backward of the chunk with per-layer rules (the per-sample machinery of
  :mod:`~uma_callbacks.linalg.layer_grads`, ``vmap`` for parameters without a rule);
- ``self_influence`` [N] = sum_{t' <= t} eta_{t'} ||g_i(theta_{t'})||^2 over the checkpoints
  this metric measured in the run so far (TracIn, Pruthi et al. 2020, "Estimating Training
  Data Influence by Tracing Gradient Descent", its self-influence TracInCP(z, z)), eta_t the
  learning rate at checkpoint t (below);
- ``loss_history`` [T, N], ``learning_rates`` [T], ``steps`` [T]: the per-checkpoint values
  the sum is made of (T checkpoints, oldest first);
- scalars: ``loss`` (the mean), ``grad_norm_mean``, ``self_influence_top10_share`` (the share
  of sum_i self_influence_i held by the ceil(N / 10) largest), ``loss_rank_correlation``
  (Spearman's rho between the per-sample losses at this checkpoint and the previous one; NaN
  at the first), ``learning_rate`` (eta_t) and ``n_checkpoints`` (T).

The learning rate: the trigger tells the metric which checkpoint comes next with
:meth:`ProbeInfluence.observe_trainer_state` (or :func:`observe_checkpoint` for a list of
metrics): the global step and the Trainer's ``log_history``; eta_t is the
``"learning_rate"`` of the latest entry logged at or before the step
(:func:`learning_rate_at`). A live Trainer passes ``state.log_history`` at ``on_save``,
which is exactly what the checkpoint's ``trainer_state.json`` holds (the Trainer writes it
just before), and a backfill passes that file's (:func:`read_trainer_state`): the same
numbers either way. Without it, eta_t = 1 (unweighted TracIn;
``meta["learning_rate_source"]`` says which).

The earlier checkpoints' values are a per-run state of the metric object (kept by every
shallow copy the compute budget makes), so a session that measures the same checkpoints in
the same order, live or in a backfill, gives the same values. A checkpoint read from the
result cache adds nothing to it; ``meta["checkpoints"]`` names the steps the sum covers.

The table (drawn as ``influence.csv`` and ``influence.png``): the ``top_k`` samples with
the largest and the smallest self-influence and current loss, with their index, loss at
each checkpoint and, when the probe has ``input_ids`` and a tokenizer was given, their text
(``meta["texts"]``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from uma_callbacks.core import validate
from uma_callbacks.core.batches import count_samples
from uma_callbacks.core.safe_json import read_json
from uma_callbacks.linalg.layer_grads import hook_plan, layer_gradient_sums
from uma_callbacks.metrics.base import ComputeContext, Cost, Metric, MetricResult

#: the longest decoded text kept per table row (characters)
MAX_TEXT_CHARS = 200
#: the largest ``trainer_state.json`` read (bytes)
MAX_TRAINER_STATE_BYTES = 64 * 2**20


class ProbeInfluence(Metric):
    r"""Per-sample probe losses and gradient norms, and TracIn self-influence across checkpoints (see the module).

    Args:
        top_k: rows of each part of the table (largest and smallest self-influence and
            current loss).
        tokenizer: decodes the table rows' ``input_ids``: a tokenizer object (anything with
            ``decode``) or a local path / name for ``AutoTokenizer.from_pretrained``
            (``local_files_only``); ``None``: no text. Not part of the values: only its
            name is configuration.
        chunk_size: samples per backward.
        timeout_seconds: stop between chunks past this time.

    Raises:
        ValueError: ``top_k`` not an integer in [1, 10000], or a tokenizer that is neither
            a string nor has ``decode``.

    Example:
        >>> lin = torch.nn.Linear(3, 1).double()
        >>> batch = {"x": torch.randn(6, 3, dtype=torch.float64), "y": torch.randn(6, 1, dtype=torch.float64)}
        >>> loss = lambda m, b: ((m(b["x"]) - b["y"]) ** 2).sum(-1)
        >>> metric = ProbeInfluence(top_k=2)
        >>> metric.observe_trainer_state(10, [{"step": 10, "learning_rate": 0.5}])
        >>> r = metric.compute(lin, [batch], loss)
        >>> bool(np.allclose(r.arrays["self_influence"], 0.5 * r.arrays["grad_norms"] ** 2)), r.scalars["n_checkpoints"]
        (True, 1.0)
    """

    name = "influence"
    needs_eager_attention = True
    cost = Cost(per_sample_grads=True, per_sample_grad_fraction=0.5)
    default_chunk_tokens = 512

    def __init__(
        self,
        top_k: int = 5,
        tokenizer: Any = None,
        *,
        chunk_size: int | None = None,
        timeout_seconds: float | None = None,
    ) -> None:
        super().__init__(chunk_size=chunk_size, timeout_seconds=timeout_seconds)
        validate.check_int("ProbeInfluence.top_k", top_k, 1, validate.MAX_TOP_K)
        if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)) and not hasattr(tokenizer, "decode"):
            raise ValueError(
                f"ProbeInfluence.tokenizer must be None, a path or name, or a tokenizer with decode(); got {type(tokenizer).__name__}"
            )
        self.top_k = top_k
        self.tokenizer_name = _tokenizer_name(tokenizer)
        self._tokenizer = tokenizer
        # the run's checkpoints so far and the one announced next: shared by the budget's
        # shallow copies (one dict), not configuration
        self._run: dict[str, Any] = {"checkpoints": [], "pending": None}

    # ------------------------------------------------------------------ the trigger's side
    def observe_trainer_state(self, global_step: int, log_history: Sequence[Mapping[str, Any]] | None) -> None:
        """Announce the checkpoint measured next: its global step and the Trainer's ``log_history`` up to it.

        Args:
            global_step: the checkpoint's step.
            log_history: ``state.log_history`` (live) or ``trainer_state.json``'s (backfill);
                ``None``: no learning rate known (eta = 1).

        Raises:
            ValueError: ``global_step`` is not a non-negative integer.
        """  # noqa: DOC502 (from check_int)
        validate.check_int("ProbeInfluence.observe_trainer_state.global_step", global_step, 0, 2**63 - 1)
        lr = learning_rate_at(log_history or [], global_step)
        self._run["pending"] = {"step": int(global_step), "learning_rate": lr}

    def reset(self) -> None:
        """Forget the run's checkpoints (a new run)."""
        self._run["checkpoints"] = []
        self._run["pending"] = None

    # ------------------------------------------------------------------ compute
    def _compute(self, ctx: ComputeContext) -> MetricResult:
        params = ctx.trainable_params()
        if not params:
            raise ValueError("ProbeInfluence: the model has no trainable parameters")
        plan = hook_plan(ctx.model, params)
        losses: list[torch.Tensor] = []
        sq_norms: list[torch.Tensor] = []
        vmapped: set[str] = set()
        for done, chunk in enumerate(ctx.chunks(), start=1):
            sums = layer_gradient_sums(ctx.model, ctx.loss_fn, chunk, params, plan, want_diag=False)
            losses.append(sums.losses.detach().to(torch.float64).reshape(-1).cpu())
            sq_norms.append(sums.sq_norms.sum(dim=1).to(torch.float64).cpu())
            vmapped.update(sums.vmapped)
            del sums
            ctx.check_time(chunks_done=done)
        loss = _gathered(torch.cat(losses), ctx)
        sq = _gathered(torch.cat(sq_norms), ctx)
        pending = self._run.get("pending") or {}
        self._run["pending"] = None
        lr = pending.get("learning_rate")
        ctx.meta["learning_rate_source"] = "log_history" if lr is not None else "none: eta = 1 (unweighted TracIn)"
        entry = {"step": pending.get("step"), "learning_rate": 1.0 if lr is None else float(lr), "losses": loss, "sq_norms": sq}
        trace = _added(self._run["checkpoints"], entry, ctx.meta)
        self._run["checkpoints"] = trace
        ctx.meta["per_sample_method"] = "hooks+vmap(grad)" if vmapped else "hooks"
        result = influence_result(trace, self.top_k, meta=ctx.meta)
        if self._tokenizer is not None and ctx.collective.world_size == 1:
            token_ids = self._texts(ctx)
            wanted = sorted({i for _, rows in table_indices(result.arrays, self.top_k) for i in rows})
            texts = {str(i): self.decode(token_ids[i]) for i in wanted if i in token_ids}
            if texts:
                ctx.meta["texts"] = texts
        return result

    def _texts(self, ctx: ComputeContext) -> dict[int, list[int]]:
        """``{sample index: its unpadded input_ids}`` of every local sample (empty without ``input_ids``)."""
        out: dict[int, list[int]] = {}
        index = 0
        for batch in ctx.batches:
            n = count_samples(batch)
            ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
            if isinstance(ids, torch.Tensor) and ids.dim() == 2:
                mask = batch.get("attention_mask")
                for i in range(n):
                    row = ids[i]
                    if isinstance(mask, torch.Tensor) and mask.shape == ids.shape:
                        row = row[mask[i].bool()]
                    out[index + i] = [int(t) for t in row.tolist()]
            index += n
        return out

    def decode(self, token_ids: Sequence[int]) -> str:
        """The text of ``token_ids`` by the tokenizer, cut to :data:`MAX_TEXT_CHARS` ("" without one or on failure)."""
        tok = self._tokenizer
        if tok is None:
            return ""
        if isinstance(tok, (str, os.PathLike)):
            try:
                from transformers import AutoTokenizer

                tok = self._tokenizer = AutoTokenizer.from_pretrained(str(tok), local_files_only=True)
            except Exception:  # noqa: BLE001 (no text is better than a lost result)
                self._tokenizer = None
                return ""
        try:
            text = str(tok.decode(list(token_ids), skip_special_tokens=True))
        except Exception:  # noqa: BLE001 (a token id the tokenizer does not know)
            return ""
        return text if len(text) <= MAX_TEXT_CHARS else text[: MAX_TEXT_CHARS - 1] + "\u2026"


def _tokenizer_name(tokenizer: Any) -> str | None:
    if tokenizer is None:
        return None
    if isinstance(tokenizer, (str, os.PathLike)):
        return str(tokenizer)
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def _gathered(local: torch.Tensor, ctx: ComputeContext) -> np.ndarray:
    """The per-sample values of every rank, rank after rank (float64 [N]); this rank's own in one process."""
    collective = ctx.collective
    if collective.world_size == 1:
        return local.numpy()
    counts = torch.zeros(collective.world_size, dtype=torch.float64)
    counts[collective.rank] = local.numel()
    collective.sum_([counts])
    offset = int(counts[: collective.rank].sum())
    full = torch.zeros(int(counts.sum()), dtype=torch.float64)
    full[offset : offset + local.numel()] = local
    collective.sum_([full])
    return full.numpy()


def _added(trace: list[dict[str, Any]], entry: dict[str, Any], meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's checkpoints with ``entry`` in its place (a step measured again replaces its values).

    A probe of another size starts a new trace (said in ``meta["trace_reset"]``).
    """
    n = entry["losses"].size
    if trace and trace[-1]["losses"].size != n:
        meta["trace_reset"] = f"the probe has {n} samples, the earlier checkpoints {trace[-1]['losses'].size}: the sum starts again"
        trace = []
    step = entry["step"]
    kept = [e for e in trace if step is None or e["step"] != step]
    kept.append(entry)
    if all(e["step"] is not None for e in kept):
        kept.sort(key=lambda e: e["step"])
    return kept


def influence_result(
    trace: Sequence[Mapping[str, Any]], top_k: int, *, meta: dict[str, Any] | None = None
) -> MetricResult:
    """The :class:`ProbeInfluence` result of the run's checkpoints so far (see the module docstring).

    Args:
        trace: per checkpoint, oldest first: ``step`` (or None), ``learning_rate``,
            ``losses`` [N] and ``sq_norms`` [N] (float64 arrays); the last is the current one.
        top_k: the table's rows per part.
        meta: the result's meta (updated).

    Returns:
        The result named ``influence``.
    """
    current = trace[-1]
    lrs = np.array([float(e["learning_rate"]) for e in trace])
    sq_history = np.stack([np.asarray(e["sq_norms"], dtype=np.float64) for e in trace])
    loss_history = np.stack([np.asarray(e["losses"], dtype=np.float64) for e in trace])
    self_influence = (lrs[:, None] * sq_history).sum(axis=0)
    losses = loss_history[-1]
    grad_norms = np.sqrt(np.maximum(sq_history[-1], 0.0))
    steps = np.array([np.nan if e["step"] is None else float(e["step"]) for e in trace])
    scalars = {
        "loss": float(losses.mean()),
        "grad_norm_mean": float(grad_norms.mean()),
        "self_influence_top10_share": top_share(self_influence, 0.1),
        "loss_rank_correlation": spearman(loss_history[-2], losses) if len(trace) > 1 else math.nan,
        "learning_rate": float(current["learning_rate"]),
        "n_checkpoints": float(len(trace)),
    }
    arrays = {
        "losses": losses,
        "grad_norms": grad_norms,
        "self_influence": self_influence,
        "loss_history": loss_history,
        "learning_rates": lrs,
        "steps": steps,
    }
    meta = meta if meta is not None else {}
    meta["checkpoints"] = [None if e["step"] is None else int(e["step"]) for e in trace]
    meta["top_k"] = int(top_k)
    return MetricResult(name=ProbeInfluence.name, scalars=scalars, arrays=arrays)


def table_indices(arrays: Mapping[str, np.ndarray], top_k: int) -> list[tuple[str, list[int]]]:
    """The table's parts: ``[(title, sample indices)]``, largest and smallest self-influence, then loss.

    Ties keep the lower index first.
    """
    out = []
    for key, label in (("self_influence", "self-influence"), ("losses", "loss")):
        values = np.asarray(arrays.get(key, []), dtype=np.float64).reshape(-1)
        if not values.size:
            continue
        k = min(top_k, values.size)
        order = np.argsort(-values, kind="stable")
        out.append((f"largest {label}", [int(i) for i in order[:k]]))
        order = np.argsort(values, kind="stable")
        out.append((f"smallest {label}", [int(i) for i in order[:k]]))
    return out


def top_share(values: np.ndarray, fraction: float) -> float:
    """The share of ``sum(values)`` held by the ceil(fraction x n) largest (NaN for a zero sum).

    Example:
        >>> top_share(np.array([9.0] + [1.0] * 9), 0.1)
        0.5
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    total = float(values.sum())
    if not values.size or total == 0 or not math.isfinite(total):
        return math.nan
    k = max(1, math.ceil(fraction * values.size))
    return float(np.sort(values)[::-1][:k].sum() / total)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of ``a`` and ``b`` (ties get their average rank; NaN when either is constant).

    Example:
        >>> spearman(np.array([1.0, 2.0, 3.0]), np.array([10.0, 30.0, 20.0]))
        0.5
    """
    ra, rb = _ranks(np.asarray(a, dtype=np.float64)), _ranks(np.asarray(b, dtype=np.float64))
    if ra.size < 2 or ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.arange(x.size, dtype=np.float64)
    sorted_x = x[order]
    start = 0
    for end in range(1, x.size + 1):  # average rank over each run of ties
        if end == x.size or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = (start + end - 1) / 2.0
            start = end
    return ranks


# ---------------------------------------------------------------------- learning rates
def learning_rate_at(log_history: Iterable[Mapping[str, Any]], step: int) -> float | None:
    """The ``"learning_rate"`` of the latest ``log_history`` entry logged at or before ``step`` (None: none).

    Entries without a numeric ``step`` and ``learning_rate``, or with a non-finite one, are
    passed over; of entries at the same step the last wins.

    Example:
        >>> learning_rate_at([{"step": 1, "learning_rate": 0.1}, {"step": 3, "learning_rate": 0.05}, {"step": 3, "loss": 2.0}], 4)
        0.05
    """
    best: tuple[int, float] | None = None
    for entry in log_history:
        if not isinstance(entry, Mapping):
            continue
        at, lr = entry.get("step"), entry.get("learning_rate")
        if isinstance(at, bool) or not isinstance(at, int) or isinstance(lr, bool) or not isinstance(lr, (int, float)):
            continue
        if at <= step and math.isfinite(float(lr)) and (best is None or at >= best[0]):
            best = (at, float(lr))
    return None if best is None else best[1]


def read_trainer_state(folder: str | os.PathLike[str]) -> tuple[int, list[Mapping[str, Any]]] | None:
    """``(global_step, log_history)`` of a checkpoint folder's ``trainer_state.json``; None when absent or unreadable.

    Read within bounds (:data:`MAX_TRAINER_STATE_BYTES`); nothing in it is trusted: a wrong
    type anywhere gives None or drops the entry.
    """
    path = Path(folder) / "trainer_state.json"
    try:
        data = read_json(path, max_bytes=MAX_TRAINER_STATE_BYTES)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    step, history = data.get("global_step"), data.get("log_history", [])
    if isinstance(step, bool) or not isinstance(step, int) or step < 0 or not isinstance(history, list):
        return None
    return step, [e for e in history if isinstance(e, dict)]


def saved_log_history(folder: str | os.PathLike[str]) -> list[Mapping[str, Any]] | None:
    """The ``log_history`` of a checkpoint folder's ``trainer_state.json`` (:func:`read_trainer_state`); None when absent."""
    state = read_trainer_state(folder)
    return state[1] if state is not None else None


def observe_checkpoint(metrics: Iterable[Any], global_step: int, log_history: Sequence[Mapping[str, Any]] | None) -> None:
    """Announce the next checkpoint to every metric that takes it (:meth:`ProbeInfluence.observe_trainer_state`).

    The one call a trigger makes before measuring a checkpoint: a live Trainer with
    ``state.global_step`` and ``state.log_history``, a backfill with
    :func:`read_trainer_state` of the checkpoint folder.
    """
    for metric in metrics:
        observe = getattr(metric, "observe_trainer_state", None)
        if callable(observe):
            observe(global_step, log_history)

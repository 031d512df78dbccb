"""``analyze_models``: the predecessor's library API, run by the backfill engine.

``analyze_models(paths, UnifiedConfig(...))`` measures each local model / checkpoint
folder on one frozen probe and returns :class:`AnalysisResults` with the predecessor's
names and shapes::

    results.models[path].metrics["fisher_information"]["trace"]
    results.models[path].metrics["loss_landscape_2d"]["grid_losses"]   # [n, n]
    results.models[path].metrics["gradient_flow"]["mean_gradient_norm"]  # [layers]

Every metric asked for has an entry; one that failed (or produced nothing) holds
``{"error": message, "status": ...}``. Each model's results are filed at its own step
(``ModelResults.step``: ``trainer_state.json``'s global step, Accelerate's ``uma_state.json``,
the trailing number of the folder name, else its position in the list). Results are cached by
:class:`ResultCache` (a journal under ``<output_dir>/cache``: JSON lines + npz, never
pickle) per (weights fingerprint, metric config, probe fingerprint): a second call with
the same models, data and settings computes nothing.

Data never comes from the hub: pass ``texts=`` (with a tokenizer, by default the one in
the model folder), ``dataset=`` (rows with ``input_ids``/``labels``), ``probe=``, or set
``UnifiedConfig.dataset_name`` to a local ``.jsonl`` (rows with ``input_ids`` or
``text``) or ``.txt`` file (one text per line). Text rows with a ``labels`` (or ``label``)
field keep it: a class id for a classification head, tokenised text beside it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from uma_callbacks.core.records import Record
from uma_callbacks.engine.journal import JOURNAL_FILE, Journal, append_line, read_lines
from uma_callbacks.engine.probe import Probe
from uma_callbacks.legacy.unified_config import UnifiedConfig

#: Our metric names -> the predecessor's result keys.
RESULT_NAMES = {
    "fisher": "fisher_information",
    "landscape": "loss_landscape_2d",
    "gradient_flow": "gradient_flow",
    "hessian": "hessian_spectrum",
}
_INDEX = "models.json"


@dataclass
class ModelResults:
    """One model's results.

    Attributes:
        path: the path as given.
        metrics: ``{result name: {key: value}}`` (``{"error": ...}`` for a failed metric).
        fingerprint: the weights fingerprint (``""`` when the model could not be loaded).
        step: the step its results are filed at (the checkpoint's own, see the module docstring).
    """

    path: str
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    fingerprint: str = ""
    step: int | None = None


@dataclass
class AnalysisResults:
    """What :func:`analyze_models` returns.

    Attributes:
        models: ``{path as given: ModelResults}``.
        config: the :class:`UnifiedConfig` used.
        probe_fingerprint: the probe every model was measured on.
    """

    models: dict[str, ModelResults] = field(default_factory=dict)
    config: UnifiedConfig | None = None
    probe_fingerprint: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (arrays as lists)."""
        return {
            "probe_fingerprint": self.probe_fingerprint,
            "config": self.config.to_dict() if self.config else {},
            "models": {
                path: {"fingerprint": r.fingerprint, "step": r.step, "metrics": _jsonable(r.metrics)}
                for path, r in self.models.items()
            },
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_dict` as JSON; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, default=str), encoding="utf-8")
        return path


class ResultCache:
    """The analysis cache: a :class:`~uma_callbacks.engine.journal.Journal` plus a path index.

    Args:
        cache_dir: the folder (``<output_dir>/cache``).
    """

    def __init__(self, cache_dir: str | os.PathLike[str] = "./analysis_results/cache") -> None:
        self.root = Path(cache_dir)
        self.journal = Journal(self.root)

    def remember(self, path: str, fingerprint: str) -> None:
        """Note that ``path`` had weights ``fingerprint`` (for :meth:`clear_model_cache`)."""
        index = self._index()
        known = index.setdefault(str(path), [])
        if fingerprint and fingerprint not in known:
            known.append(fingerprint)
            tmp = self.root / (_INDEX + ".tmp")
            tmp.write_text(json.dumps(index, indent=1), encoding="utf-8")
            os.replace(tmp, self.root / _INDEX)

    def _index(self) -> dict[str, list[str]]:
        path = self.root / _INDEX
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def clear_model_cache(self, path: str) -> int:
        """Forget every result of the model at ``path``; returns the number of records removed."""
        fingerprints = set(self._index().get(str(path), []))
        payloads, _ = read_lines(self.journal.path)
        keep = [p for p in payloads if p.get("checkpoint") not in fingerprints]
        dropped = [Record.from_dict(p) for p in payloads if p.get("checkpoint") in fingerprints]
        tmp = self.root / (JOURNAL_FILE + ".rewrite")
        tmp.unlink(missing_ok=True)
        for payload in keep:
            append_line(tmp, payload)
        if keep:
            os.replace(tmp, self.journal.path)
        else:
            self.journal.path.unlink(missing_ok=True)
        still_used = {f for p in keep for f in p.get("files", [])}
        for record in dropped:
            for rel in record.files:
                if rel not in still_used:
                    (self.root / rel).unlink(missing_ok=True)
        index = self._index()
        index.pop(str(path), None)
        (self.root / _INDEX).write_text(json.dumps(index, indent=1), encoding="utf-8")
        return len(dropped)

    def clear_all(self) -> None:
        """Remove every cached result."""
        if self.root.exists():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)

    def get_stats(self) -> dict[str, Any]:
        """``num_entries`` (ok records), ``total_size_mb``, ``num_models``, ``metrics`` (name -> count)."""
        records = [r for r in self.journal.records() if r.status in ("ok", "partial")]
        size = sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file()) if self.root.exists() else 0
        counts: dict[str, int] = {}
        for r in records:
            counts[r.metric] = counts.get(r.metric, 0) + 1
        return {
            "num_entries": len(records),
            "total_size_mb": size / 2**20,
            "num_models": len(self._index()),
            "metrics": counts,
            "cache_dir": str(self.root),
        }


def analyze_models(
    model_paths: Sequence[str],
    config: UnifiedConfig | None = None,
    *,
    texts: Sequence[str] | None = None,
    dataset: Any = None,
    tokenizer: Any = None,
    probe: Probe | None = None,
    loss_fn: Any = None,
) -> AnalysisResults:
    """Measure each model folder with the metrics ``config`` enables, on one frozen probe.

    Args:
        model_paths: local model / checkpoint folders (``config.json`` + safetensors).
        config: the predecessor's configuration; None for the defaults.
        texts: probe texts (tokenised with ``tokenizer`` or the model folder's tokenizer).
        dataset: a map-style dataset of token rows (``input_ids``, ``labels``, ...), or of
            text rows (``text`` with ``labels``/``label``: tokenised, the labels kept).
        tokenizer: a tokenizer object or folder, for ``texts``.
        probe: a ready :class:`Probe` (overrides the data arguments).
        loss_fn: per-sample loss; None for the HF default.

    Returns:
        :class:`AnalysisResults`, keyed by the paths as given.

    Raises:
        ValueError: empty ``model_paths``, bad config, or no data to build the probe from.
        RuntimeError: a metric failed and ``config.skip_on_error`` is False.
    """
    from uma_callbacks.engine.probe import pad_collate
    from uma_callbacks.engine.probe_source import build_probe
    from uma_callbacks.triggers.backfill import backfill, load_tokenizer

    if not model_paths:
        raise ValueError("analyze_models: model_paths is empty; give at least one local model folder")
    config = config or UnifiedConfig()
    settings = config.to_uma()
    paths = [str(p) for p in model_paths]
    checkpoints, steps = _own_steps(paths)
    if probe is None:
        if dataset is None and texts is None:
            dataset, texts = _local_data(config)
        text_rows = _is_text_rows(dataset)
        tok = load_tokenizer(tokenizer, [c.path for c in checkpoints]) if (texts and dataset is None) or text_rows else None
        collate = None
        if text_rows:
            dataset = TokenisedRows(dataset, tok, settings["max_length"])
            pad_id = getattr(tok, "pad_token_id", None)
            collate = partial(pad_collate, pad_token_id=pad_id if isinstance(pad_id, int) else 0)
        probe = build_probe(
            dataset, probe_size=settings["probe_size"], probe_batch_size=settings["probe_batch_size"],
            seed=settings["seed"], collate_fn=collate, texts=texts, tokenizer=tok, max_length=settings["max_length"],
            field="UnifiedConfig.dataset_name",
        )
    cache = ResultCache(Path(config.output_dir) / "cache")
    available = [m for m in settings["metrics"] if hasattr(m, "compute")]
    missing = [m.name for m in settings["metrics"] if not hasattr(m, "compute")]
    summary = backfill(
        paths, metrics=available, probe=probe, steps={str(c.path.resolve()): c.step for c in checkpoints}, output_dir=cache.root, trackers=[], trajectory=False,
        use_cache=settings["use_cache"], check_probe=False, draw_figures=settings["draw_figures"], loss_fn=loss_fn,
        device=None if config.device == "auto" else config.device, progress=bool(config.verbose), source_name="analyze",
        memory_budget=settings["memory_budget"], aggressive_cleanup=bool(config.aggressive_cleanup),
    ) if available else None
    results = AnalysisResults(config=config, probe_fingerprint=probe.fingerprint)
    by_step: dict[int, list[Record]] = {}
    for record in summary.records if summary else []:
        by_step.setdefault(record.step, []).append(record)
    for path, step in steps.items():
        model = ModelResults(path=path, step=step)
        for record in by_step.get(step, []):
            if record.metric == "checkpoint":
                message = (record.error or {}).get("message", "could not load")
                model.metrics.update({RESULT_NAMES.get(n, n): {"error": message} for n in settings["metric_names"]})
                continue
            model.fingerprint = model.fingerprint or (record.checkpoint if record.status in ("ok", "partial", "cached") else "")
            model.metrics[RESULT_NAMES.get(record.metric, record.metric)] = _seed_shape(record, cache.journal, probe)
        for name in missing:
            model.metrics[RESULT_NAMES.get(name, name)] = {"error": f"metric {name!r} is not available in this version"}
        for name in settings["metric_names"]:  # every metric asked for has an entry
            model.metrics.setdefault(
                RESULT_NAMES.get(name, name), {"error": f"no result for {name!r} at step {step}", "status": "missing"}
            )
        if model.fingerprint:
            cache.remember(path, model.fingerprint)
        results.models[path] = model
    failures = [(p, n, v["error"]) for p, m in results.models.items() for n, v in m.metrics.items() if "error" in v]
    if failures and not config.skip_on_error:
        raise RuntimeError(f"analyze_models: {len(failures)} metric(s) failed, first: {failures[0]}")
    if config.save_results:
        results.save(Path(config.output_dir) / "results.json")
    return results


def _own_steps(paths: Sequence[str]) -> tuple[list[Any], dict[str, int]]:
    """The checkpoints and ``{path: step}``: each folder's own step, else (a clash) its position.

    A folder's own step is its ``trainer_state.json`` global step, its ``uma_state.json``
    step or the trailing number of its name; a folder with none of them takes its position.
    When two folders claim one step (two runs' ``checkpoint-40``), every folder takes its
    position in ``paths`` instead.
    """
    from uma_callbacks.checkpoints import discover_checkpoints

    try:
        found = discover_checkpoints(paths)
    except ValueError:  # two folders claim one step
        found = []
    by_folder = {str(c.path.resolve()): c.step for c in found}
    steps = {p: by_folder.get(str(Path(p).resolve())) for p in paths}
    if found and None not in steps.values() and len(set(steps.values())) == len(steps):
        return found, {p: int(s) for p, s in steps.items() if s is not None}
    positions = {p: i for i, p in enumerate(paths)}
    return discover_checkpoints(paths, {str(Path(p).resolve()): i for p, i in positions.items()}), positions


def _is_text_rows(dataset: Any) -> bool:
    """Whether ``dataset`` holds rows of text (``text``, no ``input_ids``) with a label."""
    if dataset is None or not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        return False
    try:
        first = dataset[0] if len(dataset) else None
    except (IndexError, KeyError, TypeError):
        return False
    return (
        isinstance(first, Mapping) and "text" in first and "input_ids" not in first
        and ("labels" in first or "label" in first)
    )


class TokenisedRows:
    """Text rows with labels, tokenised as they are drawn (the probe draws a few of many).

    Each row becomes the tokenizer's fields (``input_ids``, ``attention_mask``, ...) for its
    ``text``, truncated to ``max_length`` tokens, and its ``labels`` (or ``label``): a class
    id stays a class id, a list stays a list of token labels.

    Args:
        rows: a map-style dataset of ``{"text", "labels"}`` (or ``"label"``) rows.
        tokenizer: a tokenizer object.
        max_length: tokens per text.
    """

    def __init__(self, rows: Any, tokenizer: Any, max_length: int) -> None:
        self.rows, self.tokenizer, self.max_length = rows, tokenizer, max_length

    def __len__(self) -> int:
        """The number of rows."""
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Row ``index``, tokenised, with its label.

        Raises:
            ValueError: the row has no ``text`` string or no ``labels``/``label``.
        """
        row = self.rows[index]
        text = row.get("text") if isinstance(row, Mapping) else None
        label = row.get("labels", row.get("label")) if isinstance(row, Mapping) else None
        if not isinstance(text, str) or label is None:
            raise ValueError(f"dataset row {index} must hold a 'text' string and 'labels' (or 'label'); got {row!r:.200}")
        encoded = self.tokenizer(text, truncation=True, max_length=self.max_length)
        out = {key: list(value) for key, value in encoded.items()}
        out["labels"] = label
        return out


def _seed_shape(record: Record, journal: Journal, probe: Probe) -> dict[str, Any]:
    if record.status not in ("ok", "partial", "cached"):
        return {"error": (record.error or {}).get("message", record.status), "status": record.status}
    result = journal.load_result(Record(**{**record.to_dict(), "scalars": record.scalars}))
    out: dict[str, Any] = dict(result.scalars)
    out.update(result.arrays)
    if record.metric in ("fisher", "hessian") and "top_eigenvalues" in result.arrays:
        out["eigenvalues"] = result.arrays["top_eigenvalues"]
    if record.metric == "landscape":
        out.setdefault("orthogonality_check", result.scalars.get("orthogonality"))
        out.setdefault("n_batches_used", len(probe.batches))
    if record.metric == "gradient_flow":
        layers = {k[len("layers/") : -len("/norm")]: v for k, v in result.scalars.items()
                  if k.startswith("layers/") and k.endswith("/norm")}
        out["layer_names"] = list(layers)
        out["mean_gradient_norm"] = np.asarray(list(layers.values()), dtype=np.float64)
        out["flow_interruptions"] = result.scalars.get("n_vanishing_layers", 0.0) + result.scalars.get(
            "n_exploding_layers", 0.0
        )
    out["status"] = record.status
    out["seconds"] = record.meta.get("seconds")
    return out


def _local_data(config: UnifiedConfig) -> tuple[Any, list[str] | None]:
    path = Path(str(config.dataset_name))
    if not path.is_file():
        raise ValueError(
            f"UnifiedConfig.dataset_name={config.dataset_name!r} is not a local file, and no texts=/dataset=/probe= "
            "was given: analyze_models never downloads; point dataset_name at a .jsonl/.txt file or pass data"
        )
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if rows and "input_ids" in rows[0]:
            for row in rows:
                row.setdefault("labels", row["input_ids"])
                row.setdefault("attention_mask", [1] * len(row["input_ids"]))
            return rows, None
        if _is_text_rows(rows):
            return rows, None  # text with labels: tokenised with the labels kept
        return None, [str(r.get("text", "")) for r in rows if r.get("text")]
    return None, [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj

"""``UnifiedConfig``: the predecessor's configuration (seed/ docs), mapped onto our engine.

Every field the predecessor documented is accepted with its default, so old scripts and
``UnifiedConfig(**json.load(f))`` keep working. An unknown field raises ``ValueError``
naming the closest valid one. :meth:`UnifiedConfig.to_uma` maps it:

==============================  ================================================
``compute_fisher``              ``FisherInformation(kind=fisher_method, top_k=fisher_top_k)``
                                (``"exact"`` -> ``kind="mc"``; no spectrum without
                                ``compute_fisher_eigenvalues``)
``compute_gradients``           ``GradientFlow()`` (with ``compute_gradient_flow``)
``compute_loss_landscape``      ``LossLandscape(n_points, span, normalization)`` when available
``compute_mechanistic``         ``AttentionHeads(seed=seed)`` and ``Circuits()``
``compute_qkov``                ``Circuits()``
``compute_representations``     ``Representations(seed=seed)``
``compute_information_theory``  ``InformationTheory(seed=seed)``
``compute_bombshell``           ``TaskVectors(base=base_model)`` (base: the first model
                                measured when ``base_model`` is None)
``compute_lottery``             ``LotteryTickets()``
``compute_modularity``          ``Modularity(seed=seed)``, plus ``FisherOverlap(task_probes)``
                                when ``task_probes`` names two or more task probes
``compute_all``                 every metric this version has
``num_samples``                 probe size; ``batch_size`` -> probe batch size
``fisher_batch_size``           Fisher chunk size; ``max_seq_length`` -> text truncation
``max_memory_gb``               ``MemoryBudget(max_gb=...)`` (``memory_budget()``), with
                                ``min_batch_size``, ``max_batch_size``,
                                ``adaptive_batch_sizing``; ``timeout_seconds`` -> per metric
``seed`` / ``use_cache`` / ``force_recompute`` / ``save_plots`` / ``output_dir``  as named
==============================  ================================================

Fields with no counterpart (``enable_qkov_interference``, ``deterministic``, ...)
are stored; when set away from their default they are listed in one warning.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import re
import warnings
from dataclasses import dataclass
from typing import Any

from uma_callbacks.metric_specs import build_metric

logger = logging.getLogger(__name__)

#: Fields :meth:`UnifiedConfig.to_uma` uses; the others are stored only.
MAPPED_FIELDS = frozenset(
    {
        "model_name", "base_model", "device", "dtype", "dataset_name", "dataset_split", "num_samples",
        "max_seq_length", "batch_size", "compute_all", "compute_fisher", "compute_gradients",
        "compute_loss_landscape", "fisher_method", "fisher_batch_size", "compute_fisher_eigenvalues",
        "compute_mechanistic", "compute_qkov",
        "compute_representations", "compute_information_theory",
        "compute_bombshell", "compute_lottery", "compute_modularity", "task_probes",
        "fisher_top_k", "loss_landscape_n_points", "loss_landscape_span", "loss_landscape_normalization",
        "compute_gradient_flow", "aggressive_cleanup", "max_memory_gb", "min_batch_size", "max_batch_size",
        "adaptive_batch_sizing", "enable_memory_tracking", "seed", "output_dir", "save_results",
        "save_plots", "verbose", "use_cache", "force_recompute", "skip_on_error", "timeout_seconds",
    }
)
NORMALIZATIONS = ("filter", "layer", "global")
FISHER_METHODS = ("empirical", "exact", "mc")
_warned: set[frozenset[str]] = set()


#: ``dtype`` values the predecessor took (``auto`` keeps the checkpoint's).
DTYPES = ("auto", "float32", "float16", "bfloat16", "float64")
#: Largest landscape span: directions are normalised to the weights' scale, so a span far
#: beyond a few units only measures overflow.
MAX_SPAN = 1e3


@dataclass(init=False)
class UnifiedConfig:
    """The predecessor's configuration, field for field (see the module docstring for the mapping).

    Raises:
        ValueError: an unknown field (with the closest valid name) or a value out of range.

    Example:
        >>> UnifiedConfig(compute_fisher=True, seed=1).to_uma()["metric_names"]
        ['fisher']
    """

    # model
    model_name: str | None = None
    base_model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    # data
    dataset_name: str = "openwebtext"
    dataset_split: str = "train"
    num_samples: int = 1000
    max_seq_length: int = 512
    # batch sizes
    batch_size: int = 32
    max_batch_size: int = 256
    min_batch_size: int = 4
    adaptive_batch_sizing: bool = True
    # metric selection
    compute_all: bool = False
    compute_fisher: bool = False
    compute_gradients: bool = False
    compute_information_theory: bool = False
    compute_representations: bool = False
    compute_mechanistic: bool = False
    compute_modularity: bool = False
    compute_lottery: bool = False
    compute_bombshell: bool = False
    compute_loss_landscape: bool = False
    compute_qkov: bool = False
    #: ``{task name: batches}`` (two or more): FisherOverlap between them with compute_modularity
    task_probes: dict | None = None
    # Fisher
    fisher_n_samples: int = 1000
    fisher_method: str = "empirical"
    fisher_batch_size: int = 128
    compute_fisher_eigenvalues: bool = True
    fisher_top_k: int = 20
    enable_qkov_interference: bool = True
    enable_cross_task_conflicts: bool = True
    # loss landscape
    loss_landscape_n_points: int = 25
    loss_landscape_span: float = 0.1
    loss_landscape_normalization: str = "layer"
    loss_landscape_batches: int = 10
    # gradients
    gradient_trajectory_steps: int = 100
    compute_gradient_flow: bool = True
    compute_gradient_pathology: bool = True
    # memory
    aggressive_cleanup: bool = True
    enable_memory_tracking: bool = False
    max_memory_gb: float = 70.0
    # reproducibility
    seed: int = 42
    deterministic: bool = True
    # output
    output_dir: str = "./analysis_results"
    save_results: bool = True
    save_plots: bool = False
    verbose: bool = True
    # advanced
    use_cache: bool = True
    force_recompute: bool = False
    skip_on_error: bool = True
    timeout_seconds: int | None = None

    def __init__(self, **kwargs: Any) -> None:
        names = [f.name for f in dataclasses.fields(self)]
        for key in kwargs:
            if key not in names:
                match = difflib.get_close_matches(key, names, n=1)
                hint = f" (did you mean {match[0]!r}?)" if match else ""
                raise ValueError(f"UnifiedConfig has no field {key!r}{hint}; valid fields: {', '.join(names)}")
        for f in dataclasses.fields(self):
            setattr(self, f.name, kwargs.get(f.name, f.default))
        self.validate()

    def validate(self) -> None:
        """Check the mapped fields' values.

        Raises:
            ValueError: naming the field and the allowed values.
        """
        _check_task_probes(self.task_probes)
        if isinstance(self.max_batch_size, int) and isinstance(self.min_batch_size, int):
            if self.max_batch_size < self.min_batch_size:
                raise ValueError(
                    f"UnifiedConfig.max_batch_size must be >= min_batch_size; got {self.max_batch_size} < {self.min_batch_size}"
                )
        for name in (
            "num_samples", "batch_size", "fisher_batch_size", "fisher_top_k", "max_seq_length", "min_batch_size",
            "max_batch_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"UnifiedConfig.{name} must be a positive integer; got {value!r}")
        n = self.loss_landscape_n_points
        if isinstance(n, bool) or not isinstance(n, int) or n < 3 or n % 2 == 0:
            raise ValueError(
                f"UnifiedConfig.loss_landscape_n_points must be an odd integer >= 3 (the grid is centred on the "
                f"weights); got {n!r}"
            )
        if self.loss_landscape_normalization not in NORMALIZATIONS:
            raise ValueError(
                f"UnifiedConfig.loss_landscape_normalization must be one of {NORMALIZATIONS!r}; "
                f"got {self.loss_landscape_normalization!r}"
            )
        if self.fisher_method not in FISHER_METHODS:
            raise ValueError(f"UnifiedConfig.fisher_method must be one of {FISHER_METHODS!r}; got {self.fisher_method!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"UnifiedConfig.seed must be an integer in [0, 2**63 - 1]; got {self.seed!r}")
        if not (isinstance(self.device, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device)):
            raise ValueError(f"UnifiedConfig.device must be one of 'auto', 'cpu', 'cuda', 'cuda:<n>', 'mps'; got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"UnifiedConfig.dtype must be one of {DTYPES!r}; got {self.dtype!r}")
        for name in ("max_memory_gb", "timeout_seconds"):
            value = getattr(self, name)
            if name == "timeout_seconds" and value is None:
                continue
            most = 2.0**30 if name == "max_memory_gb" else math.inf  # GiB: an exbibyte at most
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= most or value == math.inf:
                raise ValueError(f"UnifiedConfig.{name} must be a positive number (finite, at most {most:g}); got {value!r}")
        if not (isinstance(self.loss_landscape_span, (int, float)) and 0 < self.loss_landscape_span <= MAX_SPAN):
            raise ValueError(
                f"UnifiedConfig.loss_landscape_span must be a positive number <= {MAX_SPAN:g}; got {self.loss_landscape_span!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """All fields (``dataclasses.asdict`` works too)."""
        return dataclasses.asdict(self)

    def unmapped_settings(self) -> list[str]:
        """Fields set away from their default that have no counterpart here."""
        return sorted(
            f.name
            for f in dataclasses.fields(self)
            if f.name not in MAPPED_FIELDS and getattr(self, f.name) != f.default
        )

    def metrics(self) -> list[Any]:
        """The metric objects this configuration enables (in a fixed order).

        Each is built by :func:`~uma_callbacks.metric_specs.build_metric` with this
        configuration's ``seed``, as ``UMAConfig`` and the ``uma`` command build theirs, so
        the same metric spelled here or there has the same configuration and cache key.
        """
        self.validate()
        specs: list[dict[str, Any]] = []
        everything = self.compute_all
        if (everything or self.compute_gradients) and self.compute_gradient_flow:
            specs.append({"name": "gradient_flow"})
        if everything or self.compute_fisher:
            kind = "mc" if self.fisher_method in ("exact", "mc") else "empirical"
            top_k = self.fisher_top_k if self.compute_fisher_eigenvalues else None
            specs.append({"name": "fisher", "kind": kind, "top_k": top_k, "chunk_size": self.fisher_batch_size})
        if everything:
            specs.append({"name": "hessian"})
        if everything or self.compute_loss_landscape:
            specs.append(
                {
                    "name": "landscape",
                    "n_points": self.loss_landscape_n_points,
                    "span": float(self.loss_landscape_span),
                    "normalization": self.loss_landscape_normalization,
                }
            )
        if everything or self.compute_representations:
            specs.append({"name": "representations"})
        if everything or self.compute_information_theory:
            specs.append({"name": "information"})
        if everything or self.compute_mechanistic:
            specs.append({"name": "attention"})
        if everything or self.compute_mechanistic or self.compute_qkov:
            specs.append({"name": "circuits"})
        specs += self._weight_space_specs(everything)
        if self.timeout_seconds is not None:
            for spec in specs:
                spec["timeout_seconds"] = self.timeout_seconds
        return [build_metric(spec, self.seed, field="UnifiedConfig") for spec in specs]

    def _weight_space_specs(self, everything: bool) -> list[dict[str, Any]]:
        """``compute_bombshell``, ``compute_lottery``, ``compute_modularity`` (issue 15).

        Raises:
            ValueError: ``base_model`` is set but is not an existing local folder or file.
        """
        out: list[dict[str, Any]] = []
        if everything or self.compute_bombshell:
            base = self.base_model
            if base is not None:
                from pathlib import Path

                if not isinstance(base, str) or not base or not Path(base).exists():
                    raise ValueError(
                        f"UnifiedConfig.base_model must be a local checkpoint folder or .safetensors file for "
                        f"compute_bombshell (never downloaded), or None for the first model; got {base!r}"
                    )
            out.append({"name": "task_vectors", "base": base})
        if everything or self.compute_lottery:
            out.append({"name": "pruning"})
        if everything or self.compute_modularity:
            out.append({"name": "modularity"})
            if self.task_probes:
                out.append({"name": "fisher_overlap", "tasks": {k: list(v) for k, v in self.task_probes.items()}})
        return out

    def memory_budget(self) -> Any:
        """The :class:`~uma_callbacks.engine.budget.MemoryBudget` of the memory settings.

        Those are ``max_memory_gb``, ``min_batch_size``, ``max_batch_size`` and
        ``adaptive_batch_sizing`` (halve the chunk on an allocation failure).
        ``aggressive_cleanup`` and ``enable_memory_tracking`` need no setting: memory is
        released after every metric and every result records its measured peak
        (``meta["peak_bytes"]``, logged as ``uma/<metric>/peak_mb``).

        Raises:
            ValueError: ``min_batch_size``/``max_batch_size`` not positive or out of order.
        """  # noqa: DOC502 (from MemoryBudget)
        from uma_callbacks.engine.budget import MemoryBudget

        return MemoryBudget(
            max_gb=float(self.max_memory_gb),
            min_batch_size=self.min_batch_size,
            max_batch_size=self.max_batch_size,
            adaptive_batch_sizing=bool(self.adaptive_batch_sizing),
        )

    def to_uma(self) -> dict[str, Any]:
        """The engine settings: ``metrics``, ``metric_names``, probe size, seed, cache, budget, ...

        Warns once (per distinct set) about fields that are set but have no counterpart.
        """
        unmapped = frozenset(self.unmapped_settings())
        if unmapped and unmapped not in _warned:
            _warned.add(unmapped)
            warnings.warn(
                "UnifiedConfig: these fields are stored but have no counterpart in uma-callbacks: "
                + ", ".join(sorted(unmapped)),
                UserWarning,
                stacklevel=2,
            )
        metrics = self.metrics()
        return {
            "metrics": metrics,
            "metric_names": [m.name for m in metrics],
            "probe_size": self.num_samples,
            "probe_batch_size": self.batch_size,
            "max_length": self.max_seq_length,
            "seed": self.seed,
            "use_cache": self.use_cache and not self.force_recompute,
            "draw_figures": bool(self.save_plots),
            "memory_budget_gb": self.max_memory_gb,
            "memory_budget": self.memory_budget(),
            "timeout_seconds": self.timeout_seconds,
        }


def _check_task_probes(task_probes: Any) -> None:
    """Check that ``task_probes`` is ``None`` or ``{task name: non-empty batches}`` with at least two tasks.

    Raises:
        ValueError: anything else (task names must be non-empty and hold no ``/``).
    """
    if task_probes is None:
        return
    if (
        not isinstance(task_probes, dict)
        or len(task_probes) < 2
        or not all(isinstance(k, str) and k and "/" not in k for k in task_probes)
        or not all(isinstance(v, (list, tuple)) and v for v in task_probes.values())
    ):
        raise ValueError(
            "UnifiedConfig.task_probes must be None or a dict of at least two task names (no '/') to "
            f"non-empty lists of batches; got {task_probes!r:.80}"
        )

"""Issue 29, budgets that hold: time. Metric constructors validate every number as UMAConfig does.

``HessianSpectrum(top_k=2**63)`` was accepted and ran to the 900 s default limit at every
save; ``LossLandscape(seed=2**64)`` silently gave seed 0's numbers. Every numeric argument
of every metric class now has a range (:mod:`uma_callbacks.core.validate`), and a value
outside it is a ``ValueError`` naming the field and the range.
"""

from __future__ import annotations

import inspect
import math

import pytest

from uma_callbacks.core.validate import MAX_SEED
from uma_callbacks.metrics import METRICS

#: Integers no setting takes: a bool, a fraction, a string, and 2**63 / 2**64 (past every range).
BAD_INT = [True, 1.5, "3", 2**63, 2**64]
#: Numbers no setting takes.
BAD_NUMBER = [True, "0.5", math.nan, math.inf, -math.inf, 10**400]

#: {class name: {argument: (an accepted value, [refused values])}}; every numeric argument
#: of every metric class must be here (test_every_numeric_argument_is_covered).
CASES: dict[str, dict[str, tuple[object, list[object]]]] = {
    "GradientFlow": {
        "vanishing_ratio": (1e-6, [0, -1.0, *BAD_NUMBER]),
        "exploding_ratio": (1e6, [0, -1.0, *BAD_NUMBER]),
    },
    "HessianSpectrum": {
        "top_k": (10_000, [0, -1, 10_001, *BAD_INT]),
        "hutchinson_samples": (0, [1, -1, 10**6, *BAD_INT]),
        "tol": (1e-12, [0, -1e-3, 1e6, *BAD_NUMBER]),
        "seed": (MAX_SEED, [-1, *BAD_INT]),
        "max_iter": (200, [0, 10**7, *BAD_INT]),
        "block_size": (4, [0, 10**5, *BAD_INT]),
        "residual_tol": (1e-2, [0, 1e6, *BAD_NUMBER]),
    },
    "LossLandscape": {
        "n_points": (1001, [1, 2, 1003, 2**63 + 1, True, 5.0]),
        "span": (1e3, [0, 1e3 + 1, *BAD_NUMBER]),
        "dims": (1, [0, 3, 2**63]),
        "seed": (MAX_SEED, [-1, *BAD_INT]),
        "n_batches": (1, [0, 10**8, *BAD_INT]),
        "hessian_tol": (1e-4, [0, -1.0, 1e6, *BAD_NUMBER]),
    },
    "WeightSpectra": {
        "min_evals": (2, [1, 0, 10**9 + 1, *BAD_INT]),
        "max_entries": (1, [0, 2**40 + 1, *BAD_INT]),
    },
    "DirectionalSharpness": {
        "step": (1e3, [0, -0.01, 1e3 + 1, *BAD_NUMBER]),
        "n_batches": (1, [0, 10**8, *BAD_INT]),
    },
    "CheckpointInterpolation": {
        "n_points": (1001, [1, 1002, *BAD_INT]),
        "extend": (0.0, [-0.1, 1e3, *BAD_NUMBER]),
        "n_batches": (3, [0, 10**8, *BAD_INT]),
    },
    "FisherInformation": {
        "top_k": (10_000, [0, 10_001, *BAD_INT]),
        "mc_samples": (400, [0, 10**6, *BAD_INT]),
        "seed": (0, [-1, *BAD_INT]),
        "top_percent": (100, [0, 101, *BAD_NUMBER]),
        "cache_bytes": (0, [-1, 2**61, *BAD_INT]),
        "lanczos_tol": (1e-3, [0, 1e6, *BAD_NUMBER]),
        "max_matvecs": (60, [0, 10**7, *BAD_INT]),
    },
    "Representations": {
        "max_tokens": (2, [1, 10**9, *BAD_INT]),
        "dead_threshold": (0.0, [1.0, -0.1, *BAD_NUMBER]),
        "seed": (7, [-1, *BAD_INT]),
    },
    "InformationTheory": {
        "alpha": (0.5, [0, -1, 1e4, *BAD_NUMBER]),
        "max_tokens": (64, [1, 10**9, *BAD_INT]),
        "seed": (7, [-1, *BAD_INT]),
        "mi_tokens": (2, [1, 10**9, *BAD_INT]),
        "pid_bins": (2, [1, 10**4, *BAD_INT]),
        "pid_components": (1, [0, 10**4, *BAD_INT]),
        "pid_layers": ([0, -1], [[0, 2**63], [0, 1.5], [0, True], [0]]),
    },
    "AttentionHeads": {
        "induction_len": (2, [1, 10**9, *BAD_INT]),
        "n_induction_seqs": (1, [0, 10**6, *BAD_INT]),
        "head_threshold": (1.0, [0, 1.5, *BAD_NUMBER]),
        "seed": (MAX_SEED, [-1, *BAD_INT]),
    },
    "FisherOverlap": {
        "top_percent": (0.5, [0, 101, *BAD_NUMBER]),
        "mc_samples": (2, [0, 10**6, *BAD_INT]),
        "seed": (MAX_SEED, [-1, *BAD_INT]),
    },
    "TaskVectors": {
        "ties_density": (1.0, [0, 1.5, *BAD_NUMBER]),
        "ties_lambda": (0.8, [0, 1e4, *BAD_NUMBER]),
        "fisher_floor": (0.0, [-1e-9, *BAD_NUMBER]),
        "n_batches": (2, [0, 10**8, *BAD_INT]),
    },
    "LotteryTickets": {
        "sparsities": ([0.5, 0.9], [[1.0], [0.0], [math.nan], [True], [0.5, 10**400]]),
        "main_sparsity": (0.9, [1.0, 0, *BAD_NUMBER]),
        "eb_threshold": (1.0, [0, 1.5, *BAD_NUMBER]),
        "eb_patience": (3, [0, 10**4, *BAD_INT]),
        "n_batches": (2, [0, 10**8, *BAD_INT]),
    },
    "Modularity": {
        "n_clusters": (2, [1, 10**5, *BAD_INT]),
        "seed": (MAX_SEED, [-1, *BAD_INT]),
        "n_init": (1, [0, 10**4, *BAD_INT]),
    },
    "HessianDensity": {
        "n_vectors": (2, [1, 0, 100_001, *BAD_INT]),
        "n_steps": (3, [2, 10**6 + 1, *BAD_INT]),
        "grid_points": (100_000, [15, 100_001, *BAD_INT]),
        "bandwidth": (1.0, [0, -0.01, 1.5, *BAD_NUMBER]),
        "edge_threshold": (1e-12, [0, 1.0, -0.1, *BAD_NUMBER]),
        "min_gap": (0.999, [0, 1.0, -0.1, *BAD_NUMBER]),
        "seed": (MAX_SEED, [-1, *BAD_INT]),
    },
    "ProbeInfluence": {
        "top_k": (10_000, [0, 10_001, *BAD_INT]),
    },
}
#: What every metric takes through ``Metric.__init__``.
COMMON = {
    "chunk_size": (1, [0, -1, 2**31, *BAD_INT]),
    "timeout_seconds": (3600, [0, -1.0, 1e8, *BAD_NUMBER]),
}
CLASSES = {cls.__name__: cls for cls in METRICS.values()}


def _takes(cls: type, name: str) -> bool:
    return name in inspect.signature(cls).parameters


def _fields(cls_name: str) -> dict[str, tuple[object, list[object]]]:
    """The argument cases of one class, with the common ones it takes."""
    cls = CLASSES[cls_name]
    return {**CASES.get(cls_name, {}), **{k: v for k, v in COMMON.items() if _takes(cls, k)}}


def _cases():
    for cls_name in sorted(CLASSES):
        for field, (_, bad_values) in sorted(_fields(cls_name).items()):
            for bad in bad_values:
                yield pytest.param(cls_name, field, bad, id=f"{cls_name}.{field}={bad!r:.24}")


def _kwargs(cls_name: str, field: str, value: object) -> dict[str, object]:
    # main_sparsity must be one of the sparsities only when given: give both consistently
    if cls_name == "LotteryTickets" and field == "main_sparsity":
        return {"sparsities": [0.5, 0.9], field: value}
    return {field: value}


@pytest.mark.parametrize(("cls_name", "field", "bad"), list(_cases()))
def test_out_of_range_is_refused_naming_the_field_and_the_range(cls_name, field, bad):
    with pytest.raises(ValueError, match=rf"{cls_name}\.{field}\b") as info:
        CLASSES[cls_name](**_kwargs(cls_name, field, bad))
    message = str(info.value)
    offending = bad if isinstance(bad, list) else [bad]  # a list names its bad entry
    assert "must be" in message and any(repr(x)[:20] in message for x in offending), message


@pytest.mark.parametrize(("cls_name", "field"), [(c, f) for c in sorted(CLASSES) for f in sorted(_fields(c))])
def test_a_value_at_the_edge_of_the_range_is_accepted(cls_name, field):
    good = _fields(cls_name)[field][0]
    metric = CLASSES[cls_name](**_kwargs(cls_name, field, good))
    assert metric is not None


def _numeric(parameter: inspect.Parameter) -> bool:
    default, annotation = parameter.default, str(parameter.annotation)
    if isinstance(default, bool):
        return False
    if isinstance(default, (int, float)):
        return True
    if isinstance(default, (list, tuple)) and default and all(isinstance(x, (int, float)) for x in default):
        return True
    return default is None and ("int" in annotation or "float" in annotation)


def test_every_numeric_argument_is_covered():
    missing = []
    for cls_name, cls in sorted(CLASSES.items()):
        for name, parameter in inspect.signature(cls).parameters.items():
            if _numeric(parameter) and name not in CASES.get(cls_name, {}) and name not in COMMON:
                missing.append(f"{cls_name}.{name}")
    assert not missing, f"numeric constructor arguments without a range test: {missing}"


def test_the_issues_examples():
    from uma_callbacks.metrics import HessianSpectrum, LossLandscape

    with pytest.raises(ValueError, match=r"HessianSpectrum\.top_k must be an integer in \[1, 10000\]"):
        HessianSpectrum(top_k=2**63)
    with pytest.raises(ValueError, match=r"LossLandscape\.seed must be an integer in \[0, 2\*\*63 - 1\]"):
        LossLandscape(seed=2**64)
    assert LossLandscape(seed=MAX_SEED).seed == MAX_SEED

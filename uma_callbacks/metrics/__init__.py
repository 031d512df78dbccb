"""Metrics: pure computations on ``(model, batches, loss_fn)``, one family per module.

``METRICS`` maps each string name (as used in ``UMACallback(metrics=[...])``) to its class.
"""

from uma_callbacks.metrics.attention import AttentionHeads
from uma_callbacks.metrics.base import Cost, Metric, MetricResult
from uma_callbacks.metrics.circuits import Circuits
from uma_callbacks.metrics.fisher import FisherInformation
from uma_callbacks.metrics.fisher_overlap import FisherOverlap
from uma_callbacks.metrics.gradient_flow import GradientFlow
from uma_callbacks.metrics.hessian import HessianSpectrum
from uma_callbacks.metrics.hessian_density import HessianDensity
from uma_callbacks.metrics.influence import ProbeInfluence
from uma_callbacks.metrics.information import InformationTheory
from uma_callbacks.metrics.interpolation import CheckpointInterpolation
from uma_callbacks.metrics.landscape import LossLandscape
from uma_callbacks.metrics.modularity import Modularity
from uma_callbacks.metrics.optimizer_state import OptimizerState
from uma_callbacks.metrics.pruning import LotteryTickets
from uma_callbacks.metrics.representations import Representations
from uma_callbacks.metrics.sharpness import DirectionalSharpness
from uma_callbacks.metrics.task_vectors import TaskVectors
from uma_callbacks.metrics.trajectory import Trajectory
from uma_callbacks.metrics.weight_spectra import WeightSpectra

METRICS: dict[str, type[Metric]] = {
    GradientFlow.name: GradientFlow,
    HessianSpectrum.name: HessianSpectrum,
    LossLandscape.name: LossLandscape,
    CheckpointInterpolation.name: CheckpointInterpolation,
    FisherInformation.name: FisherInformation,
    Trajectory.name: Trajectory,
    Representations.name: Representations,
    InformationTheory.name: InformationTheory,
    AttentionHeads.name: AttentionHeads,
    Circuits.name: Circuits,
    FisherOverlap.name: FisherOverlap,
    TaskVectors.name: TaskVectors,
    LotteryTickets.name: LotteryTickets,
    Modularity.name: Modularity,
    WeightSpectra.name: WeightSpectra,
    DirectionalSharpness.name: DirectionalSharpness,
    OptimizerState.name: OptimizerState,
    HessianDensity.name: HessianDensity,
    ProbeInfluence.name: ProbeInfluence,
}


def register_metric(cls: type[Metric], *, replace: bool = False) -> type[Metric]:
    """Make a metric class usable by its string name in every trigger and the CLI.

    Usable as a decorator. The class must subclass :class:`Metric` and set ``name``.

    Raises:
        ValueError: not a ``Metric`` subclass, no ``name``, or the name is taken by another
            class (pass ``replace=True`` to override it).

    Example:
        >>> class Zero(Metric):
        ...     name = "zero_example"
        ...     def _compute(self, ctx):
        ...         return MetricResult(self.name, scalars={"value": 0.0})
        >>> register_metric(Zero) is Zero and METRICS["zero_example"] is Zero
        True
        >>> _ = METRICS.pop("zero_example")
    """
    if not (isinstance(cls, type) and issubclass(cls, Metric)):
        raise ValueError(f"register_metric: expected a Metric subclass; got {cls!r}")
    if not isinstance(cls.name, str) or not cls.name:
        raise ValueError(f"register_metric: {cls.__name__}.name must be a non-empty string")
    if METRICS.get(cls.name, cls) is not cls and not replace:
        raise ValueError(
            f"register_metric: the name {cls.name!r} is taken by {METRICS[cls.name].__name__}; pass replace=True"
        )
    METRICS[cls.name] = cls
    return cls


__all__ = [
    "METRICS",
    "register_metric",
    "AttentionHeads",
    "CheckpointInterpolation",
    "DirectionalSharpness",
    "Circuits",
    "Cost",
    "FisherInformation",
    "FisherOverlap",
    "GradientFlow",
    "HessianDensity",
    "HessianSpectrum",
    "InformationTheory",
    "LossLandscape",
    "LotteryTickets",
    "Metric",
    "MetricResult",
    "Modularity",
    "OptimizerState",
    "ProbeInfluence",
    "Representations",
    "TaskVectors",
    "Trajectory",
    "WeightSpectra",
]

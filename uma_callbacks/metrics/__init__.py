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
from uma_callbacks.metrics.information import InformationTheory
from uma_callbacks.metrics.interpolation import CheckpointInterpolation
from uma_callbacks.metrics.landscape import LossLandscape
from uma_callbacks.metrics.modularity import Modularity
from uma_callbacks.metrics.pruning import LotteryTickets
from uma_callbacks.metrics.representations import Representations
from uma_callbacks.metrics.task_vectors import TaskVectors
from uma_callbacks.metrics.trajectory import Trajectory

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
}

__all__ = [
    "METRICS",
    "AttentionHeads",
    "CheckpointInterpolation",
    "Circuits",
    "Cost",
    "FisherInformation",
    "FisherOverlap",
    "GradientFlow",
    "HessianSpectrum",
    "InformationTheory",
    "LossLandscape",
    "LotteryTickets",
    "Metric",
    "MetricResult",
    "Modularity",
    "Representations",
    "TaskVectors",
    "Trajectory",
]

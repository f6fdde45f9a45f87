"""Evaluation metrics: pure functionals in :mod:`probseg.metrics.functional`; torchmetrics
classes (state and cross-process sync only) here."""

from probseg.metrics.base import PerImageMetric
from probseg.metrics.hypotheses import (
    METRIC_NAMES,
    POOLED_NAMES,
    HypothesisMetrics,
    MeanPredictionMetrics,
    RaterCoverage,
)
from probseg.metrics.segmentation import (
    BinarizedDice,
    DiceScore,
    EmpiricalWasserstein,
    ExpectedCalibrationError,
    GeneralizedEnergyDistance,
    GiniIndex,
    SampleDiversity,
)

__all__ = [
    "METRIC_NAMES",
    "POOLED_NAMES",
    "BinarizedDice",
    "DiceScore",
    "EmpiricalWasserstein",
    "ExpectedCalibrationError",
    "GeneralizedEnergyDistance",
    "GiniIndex",
    "HypothesisMetrics",
    "MeanPredictionMetrics",
    "PerImageMetric",
    "RaterCoverage",
    "SampleDiversity",
]

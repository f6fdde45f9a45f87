"""Metric functionals: pure functions on per-image tensors, never reduced over the batch.

Shapes: predictions (B, S, H, W) (binary masks or foreground probabilities) or (B, S, K, H, W)
class probabilities; rater masks (B, R, H, W); ``rater_mask`` (B, R) bool; results (B,) or
(B, S, R). Conventions are stated in each module's docstring.
"""

from probseg.metrics.functional.calibration import (
    BDICE_THRESHOLDS,
    binarized_dice,
    calibration_bins,
    calibration_error_from_bins,
    calibration_statistics,
    class_probabilities,
    dice_from_statistics,
    dice_score,
    dice_statistics,
    expected_calibration_error,
    mean_prediction_statistics,
)
from probseg.metrics.functional.gini import GINI_OF, gini_index, singular_values
from probseg.metrics.functional.kernels import (
    CE_EPS,
    CE_READINGS,
    HAUSDORFF_EMPTY,
    KERNELS,
    check_hausdorff_empty,
    check_kernels,
    foreground_windows,
    pairwise_cost,
    pairwise_costs,
    per_class_pairwise_cost,
    squared_distance_transform,
)
from probseg.metrics.functional.sets import (
    MATCHINGS,
    diversity_from_costs,
    empirical_wasserstein,
    energy_distance_from_costs,
    generalized_energy_distance,
    matched_cost,
    sample_diversity,
    sample_weights,
    set_mean,
)

__all__ = [
    "BDICE_THRESHOLDS",
    "CE_EPS",
    "CE_READINGS",
    "HAUSDORFF_EMPTY",
    "GINI_OF",
    "KERNELS",
    "MATCHINGS",
    "binarized_dice",
    "calibration_bins",
    "calibration_error_from_bins",
    "calibration_statistics",
    "check_hausdorff_empty",
    "check_kernels",
    "class_probabilities",
    "dice_from_statistics",
    "dice_score",
    "dice_statistics",
    "diversity_from_costs",
    "empirical_wasserstein",
    "energy_distance_from_costs",
    "expected_calibration_error",
    "generalized_energy_distance",
    "gini_index",
    "matched_cost",
    "mean_prediction_statistics",
    "foreground_windows",
    "pairwise_cost",
    "pairwise_costs",
    "per_class_pairwise_cost",
    "sample_diversity",
    "sample_weights",
    "set_mean",
    "singular_values",
    "squared_distance_transform",
]

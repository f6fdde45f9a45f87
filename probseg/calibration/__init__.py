"""Post-hoc recalibration of segmentation probabilities.

:mod:`probseg.calibration.kde`: kernel-density (Dirichlet / Beta kernel) estimate of E[y | f(x)]
with class-balanced, importance-weighted key points (Popordanoska et al. 2022; the calibrated
teacher of Wang et al.'s knowledge distillation, Appendix E).
"""

from probseg.calibration.kde import (
    PROB_FLOOR,
    REGIONS,
    KDECalibration,
    beta_log_kernel,
    calibration_region,
    dirichlet_log_kernel,
    kde_calibrate,
    kde_estimate,
    sample_key_points,
)

__all__ = [
    "PROB_FLOOR",
    "REGIONS",
    "KDECalibration",
    "beta_log_kernel",
    "calibration_region",
    "dirichlet_log_kernel",
    "kde_calibrate",
    "kde_estimate",
    "sample_key_points",
]

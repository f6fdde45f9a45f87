"""torchmetrics classes of the zoo's metrics: state and cross-process sync only; the maths lives
in :mod:`probseg.metrics.functional`. Each ``update`` takes an optional ``index`` (B,) of dataset
indices so padded DDP repeats are counted once (see :mod:`probseg.metrics.base`)."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from probseg.metrics import functional as F
from probseg.metrics.base import PerImageMetric


class EmpiricalWasserstein(PerImageMetric):
    """Mean over images of :func:`~probseg.metrics.functional.empirical_wasserstein`.

    Args:
        kernel: "iou", "dice", "hausdorff" or "ce".
        eps: probability clamp of the "ce" kernel.
    """

    higher_is_better = False

    def __init__(self, kernel: str = "iou", eps: float = F.CE_EPS, **kwargs: Any) -> None:
        if kernel not in F.KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; expected one of {F.KERNELS}")
        super().__init__(("value",), **kwargs)
        self.kernel, self.eps = kernel, eps

    def update(self, pred: torch.Tensor, target: torch.Tensor, rater_mask: torch.Tensor | None = None,
               index: torch.Tensor | None = None) -> None:
        value = F.empirical_wasserstein(pred, target, self.kernel, rater_mask, eps=self.eps)
        self._store({"value": value}, index)


class GeneralizedEnergyDistance(PerImageMetric):
    """Mean over images of :func:`~probseg.metrics.functional.generalized_energy_distance`."""

    higher_is_better = False

    def __init__(self, self_pairs: bool = True, **kwargs: Any) -> None:
        super().__init__(("value",), **kwargs)
        self.self_pairs = self_pairs

    def update(self, pred: torch.Tensor, target: torch.Tensor, rater_mask: torch.Tensor | None = None,
               index: torch.Tensor | None = None) -> None:
        value = F.generalized_energy_distance(pred, target, rater_mask, self.self_pairs)
        self._store({"value": value}, index)


class SampleDiversity(PerImageMetric):
    """Mean over images of :func:`~probseg.metrics.functional.sample_diversity`."""

    higher_is_better = None

    def __init__(self, self_pairs: bool = True, **kwargs: Any) -> None:
        super().__init__(("value",), **kwargs)
        self.self_pairs = self_pairs

    def update(self, pred: torch.Tensor, index: torch.Tensor | None = None) -> None:
        self._store({"value": F.sample_diversity(pred, self.self_pairs)}, index)


class ExpectedCalibrationError(PerImageMetric):
    """Mean over images of :func:`~probseg.metrics.functional.expected_calibration_error`."""

    higher_is_better = False

    def __init__(self, num_bins: int = 15, **kwargs: Any) -> None:
        if num_bins < 1:
            raise ValueError(f"num_bins must be positive, got {num_bins}")
        super().__init__(("value",), **kwargs)
        self.num_bins = num_bins

    def update(self, pred: torch.Tensor, target: torch.Tensor, rater_mask: torch.Tensor | None = None,
               index: torch.Tensor | None = None) -> None:
        value = F.expected_calibration_error(pred, target, rater_mask, self.num_bins)
        self._store({"value": value}, index)


class DiceScore(PerImageMetric):
    """Mean over images of :func:`~probseg.metrics.functional.dice_score`."""

    higher_is_better = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(("value",), **kwargs)

    def update(self, pred: torch.Tensor, target: torch.Tensor, rater_mask: torch.Tensor | None = None,
               index: torch.Tensor | None = None) -> None:
        self._store({"value": F.dice_score(pred, target, rater_mask)}, index)


class BinarizedDice(PerImageMetric):
    """Mean over images of :func:`~probseg.metrics.functional.binarized_dice`."""

    higher_is_better = True

    def __init__(self, thresholds: Sequence[float] = F.BDICE_THRESHOLDS, **kwargs: Any) -> None:
        super().__init__(("value",), **kwargs)
        self.thresholds = tuple(thresholds)

    def update(self, pred: torch.Tensor, target: torch.Tensor, rater_mask: torch.Tensor | None = None,
               index: torch.Tensor | None = None) -> None:
        self._store({"value": F.binarized_dice(pred, target, rater_mask, self.thresholds)}, index)


class GiniIndex(PerImageMetric):
    """Mean over images of :func:`~probseg.metrics.functional.gini_index` of the prior sigmas."""

    higher_is_better = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(("value",), **kwargs)

    def update(self, sigma: torch.Tensor, index: torch.Tensor | None = None) -> None:
        self._store({"value": F.gini_index(sigma)}, index)

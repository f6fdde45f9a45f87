"""Every evaluation metric of a set of hypotheses in one torchmetrics object.

:class:`HypothesisMetrics` takes the class probabilities of S hypotheses and the rater masks and
stores, per image: the Hungarian-matched empirical Wasserstein metric for each kernel
(``hm_iou``, ``hm_dice``, ``hm_hausdorff``, ``hm_ce``), ``ged``, ``diversity``, ``ece``, ``dice``,
``bdice`` and, when the prior's sigmas are given, ``gini``. The 1 - IoU distances are computed once and
shared by ``hm_iou``, ``ged`` and ``diversity``. Next to the per-image means, ``compute`` gives the
dataset-pooled ``ece_pooled`` and ``dice_pooled`` (:data:`POOLED_NAMES`): the ECE with its bins
filled by every pixel of every image, and 2 sum |P and G| / (sum |P| + sum |G|) over all pixels
(see :mod:`probseg.metrics.functional.calibration`), from per-image statistics deduplicated by
dataset index like the values.

Weighted hypotheses (``update(..., sample_weight=...)``, e.g. a mixture of experts): the set
metrics weight each hypothesis (see :mod:`probseg.metrics.functional.sets`) and the mean
prediction behind ``ece``, ``dice`` and ``bdice`` is the weighted mean.

Hypotheses are binarized by arg-max (for K = 2: foreground where p > 0.5). With K > 2 classes
the pairwise costs are one-vs-rest per foreground class, averaged over the classes (so each
hypothesis is matched as a whole segmentation).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from probseg._ops import check_probabilities, check_rater_mask
from probseg.metrics import functional as F
from probseg.metrics.base import PerImageMetric

METRIC_NAMES = ("hm_iou", "hm_dice", "hm_hausdorff", "hm_ce", "ged", "diversity", "ece", "dice", "bdice", "gini")
"""Every name :class:`HypothesisMetrics` can report, in table order."""


MEAN_PREDICTION_NAMES = ("ece", "dice", "bdice")
"""The metrics that only need the pixel-wise mean prediction."""

POOLED_NAMES = ("ece_pooled", "dice_pooled")
"""The dataset-pooled values reported next to the per-image ``ece`` and ``dice``."""

POOLED_STATISTICS = ("ece", "dice")
"""The per-image statistics behind :data:`POOLED_NAMES`: ECE bins (M, 3) and Dice counts (K-1, 2)."""


mean_prediction_statistics = F.mean_prediction_statistics
"""The ``{ece, dice, bdice}`` of :func:`mean_prediction_values` with the ``{ece, dice}`` statistics
that pool them: (B, M, 3) ECE bins and (B, K-1, 2) Dice counts (see :func:`pooled_values`)."""


def mean_prediction_values(probs: torch.Tensor, target: torch.Tensor, rater_mask: torch.Tensor | None,
                           num_bins: int = 15) -> dict[str, torch.Tensor]:
    """{ece, dice, bdice}: (B,) each, of (B, S, K, H, W) class probabilities against raters."""
    return mean_prediction_statistics(probs, target, rater_mask, num_bins)[0]


def pooled_values(statistics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{ece_pooled, dice_pooled}`` of N images from their per-image statistics (the ``{ece,
    dice}`` of :func:`mean_prediction_statistics`, (N, ...) each): the bins and counts are summed over
    the images first. NaN for no image."""
    if statistics["ece"].shape[0] == 0:
        nan = torch.full((), float("nan"), dtype=statistics["ece"].dtype, device=statistics["ece"].device)
        return {name: nan for name in POOLED_NAMES}
    return {"ece_pooled": F.calibration_error_from_bins(statistics["ece"].sum(0)),
            "dice_pooled": F.dice_from_statistics(statistics["dice"].sum(0))}


class _PooledMeanPrediction(PerImageMetric):
    """A per-image metric that also stores the mean prediction's ECE bins and Dice counts
    (:data:`POOLED_STATISTICS`) and reports their pooled values (:data:`POOLED_NAMES`)."""

    def pool(self, statistics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{ece_pooled, dice_pooled}``; see :func:`pooled_values`."""
        return pooled_values(statistics)


class MeanPredictionMetrics(_PooledMeanPrediction):
    """ECE, Dice and BDice of a pixel-wise prediction, per image, synced and deduplicated, and the
    dataset-pooled ECE and Dice: the metrics that apply to probabilities that are not hypotheses
    (e.g. a calibrated teacher).

    Args:
        num_bins: ECE bins.
        **kwargs: torchmetrics ``Metric`` options.
    """

    higher_is_better = None

    def __init__(self, num_bins: int = 15, **kwargs: Any) -> None:
        super().__init__(MEAN_PREDICTION_NAMES, POOLED_STATISTICS, **kwargs)
        self.num_bins = num_bins

    def update(self, probs: torch.Tensor, target: torch.Tensor, rater_mask: torch.Tensor | None = None,
               index: torch.Tensor | None = None) -> None:
        """Add a batch of (B, K, H, W) or (B, S, K, H, W) class probabilities (S is averaged)."""
        if probs.ndim == 4:
            probs = probs[:, None]
        values, statistics = mean_prediction_statistics(probs, target, rater_mask, self.num_bins)
        self._store(values, index, statistics)


class RaterCoverage(PerImageMetric):
    """``raters_marking`` per image: the fraction of the image's present raters whose mask marks
    any foreground pixel (class >= 1). It defines the results tables' subsets (images where any /
    every rater marks a structure; :data:`probseg.results.SUBSETS`) and the fraction of images
    where every rater's mask is empty.

    Args:
        **kwargs: torchmetrics ``Metric`` options.
    """

    higher_is_better = None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(("raters_marking",), **kwargs)

    def update(self, target: torch.Tensor, rater_mask: torch.Tensor | None = None,
               index: torch.Tensor | None = None) -> None:
        """Add a batch of (B, R, H, W) rater class ids."""
        if target.ndim != 4 or target.is_floating_point():
            raise ValueError(f"target must be (B, R, H, W) integer class ids, got {tuple(target.shape)} {target.dtype}")
        present = check_rater_mask(rater_mask, target).to(torch.float64)
        marks = (target > 0).flatten(2).any(-1).to(torch.float64)
        self._store({"raters_marking": (marks * present).sum(1) / present.sum(1)}, index)


class HypothesisMetrics(_PooledMeanPrediction):
    """Set metrics of hypotheses against raters, per image, synced and deduplicated.

    Args:
        num_classes: K (binary = 2).
        kernels: kernels of the empirical Wasserstein metric (subset of "iou", "dice",
            "hausdorff", "ce").
        gini: also store the Gini index of the prior sigmas (``update(..., sigma=...)``).
        num_bins: ECE bins.
        self_pairs: GED and diversity include i = j pairs (the published convention).
        eps: probability clamp of the "ce" kernel.
        matching: how hypotheses meet raters when R does not divide S, one of
            :data:`probseg.metrics.functional.MATCHINGS` (default "lcm": exact optimal transport).
        gini_of: the Gini index of the prior's "sigma" (default) or "variance" (see
            :mod:`probseg.metrics.functional.gini`).
        ce_reading: the "ce" kernel's reading, one of
            :data:`probseg.metrics.functional.CE_READINGS` (default "mean").
        hausdorff_empty: the Hausdorff distance between a mask and an empty one, one of
            :data:`probseg.metrics.functional.HAUSDORFF_EMPTY` (default "diagonal"; "nan" stores
            NaN for the image, which the means over images leave out).
        **kwargs: torchmetrics ``Metric`` options.
    """

    higher_is_better = None

    def __init__(
        self,
        num_classes: int = 2,
        kernels: Sequence[str] = F.KERNELS,
        gini: bool = True,
        num_bins: int = 15,
        self_pairs: bool = True,
        eps: float = F.CE_EPS,
        matching: str = "lcm",
        gini_of: str = "sigma",
        ce_reading: str = "mean",
        hausdorff_empty: str = "diagonal",
        **kwargs: Any,
    ) -> None:
        F.check_kernels(kernels)
        F.check_hausdorff_empty(hausdorff_empty)
        if ce_reading not in F.CE_READINGS:
            raise ValueError(f"ce_reading must be one of {F.CE_READINGS}, got {ce_reading!r}")
        F.singular_values(torch.ones(1, 1), gini_of)  # checks the name
        if matching not in F.MATCHINGS:
            raise ValueError(f"matching must be one of {F.MATCHINGS}, got {matching!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        names = [f"hm_{k}" for k in F.KERNELS if k in kernels] + ["ged", "diversity", "ece", "dice", "bdice"]
        super().__init__(tuple(names + (["gini"] if gini else [])), POOLED_STATISTICS, **kwargs)
        self.num_classes = num_classes
        self.kernels = tuple(k for k in F.KERNELS if k in kernels)
        self.num_bins, self.self_pairs, self.eps, self.matching = num_bins, self_pairs, eps, matching
        self.gini_of, self.ce_reading, self.hausdorff_empty = gini_of, ce_reading, hausdorff_empty

    def _costs(self, probs: torch.Tensor, labels: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """{kernel: (B, S, R)} for the kernels stored plus "iou" (GED needs it)."""
        kernels = tuple(k for k in F.KERNELS if k in self.kernels or k == "iou")
        if self.num_classes == 2:
            return F.pairwise_costs(labels == 1, target == 1, kernels, probs=probs[:, :, 1], eps=self.eps,
                                    ce_reading=self.ce_reading, hausdorff_empty=self.hausdorff_empty)
        return {
            k: F.per_class_pairwise_cost(probs if k == "ce" else labels, target, self.num_classes, k, eps=self.eps,
                                         ce_reading=self.ce_reading, hausdorff_empty=self.hausdorff_empty)
            for k in kernels
        }

    def update(
        self,
        probs: torch.Tensor,
        target: torch.Tensor,
        rater_mask: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
        sigma: torch.Tensor | None = None,
        sample_weight: torch.Tensor | None = None,
    ) -> None:
        """Add a batch.

        Args:
            probs: (B, S, K, H, W) class probabilities of the hypotheses.
            target: (B, R, H, W) rater class ids.
            rater_mask: (B, R) bool; absent raters are left out.
            index: (B,) dataset indices (deduplication of padded DDP repeats).
            sigma: (B, L) prior standard deviations, required when ``gini`` is stored.
            sample_weight: (B, S) weights of the hypotheses (None: uniform).
        """
        if probs.ndim != 5 or probs.shape[2] != self.num_classes:
            raise ValueError(f"probs must be (B, S, {self.num_classes}, H, W) class probabilities, got {tuple(probs.shape)}")
        check_probabilities(probs, "probs")
        if target.ndim != 4 or target.is_floating_point():
            raise ValueError(f"target must be (B, R, H, W) integer class ids, got {tuple(target.shape)} {target.dtype}")
        if target.shape[0] != probs.shape[0] or target.shape[-2:] != probs.shape[-2:]:
            raise ValueError(f"probs {tuple(probs.shape)} and target {tuple(target.shape)} must share B, H and W")
        if not torch.allclose(probs.sum(dim=2), torch.ones((), dtype=probs.dtype, device=probs.device), atol=1e-3):
            raise ValueError("probs must sum to 1 over the class dimension (dim 2); pass softmax(logits, dim=2)")
        if "gini" in self.value_names and (sigma is None or sigma.ndim != 2 or sigma.shape[0] != probs.shape[0]):
            raise ValueError(
                f"this HypothesisMetrics stores the Gini index: pass sigma = (B, L) prior sigmas with B = {probs.shape[0]}, "
                f"got {None if sigma is None else tuple(sigma.shape)}"
            )
        if self.num_classes == 2:
            labels = (probs[:, :, 1] > probs[:, :, 0]).long()  # arg-max, ties to class 0, without a strided reduction
        else:
            labels = probs.movedim(2, -1).contiguous().argmax(dim=-1)
        weight = F.sample_weights(sample_weight, probs.shape[:2])
        costs = self._costs(probs, labels, target)
        if weight is not None and self.matching != "lcm":
            raise ValueError(f"weighted hypotheses are matched by optimal transport only: matching='lcm', got "
                             f"{self.matching!r}")
        values = {f"hm_{k}": F.matched_cost(costs[k], rater_mask, weight, self.matching) for k in self.kernels}
        iou = costs["iou"]
        within_pred = self._within(labels)
        within_target = self._within(target)
        values["ged"] = F.energy_distance_from_costs(iou, within_pred, within_target, rater_mask, self.self_pairs,
                                                     weight)
        values["diversity"] = F.diversity_from_costs(within_pred, self.self_pairs, weight)
        if weight is not None:  # the weighted mean prediction, as one hypothesis
            probs = (probs * weight.to(probs.dtype)[:, :, None, None, None]).sum(dim=1, keepdim=True)
        mean_values, statistics = mean_prediction_statistics(probs, target, rater_mask, self.num_bins)
        values.update(mean_values)
        if "gini" in self.value_names:
            values["gini"] = F.gini_index(F.singular_values(sigma, self.gini_of))
        self._store(values, index, statistics)

    def _within(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, N, N) 1 - IoU between the members of one set of class-id maps."""
        if self.num_classes == 2:
            fg = labels == 1
            return F.pairwise_cost(fg, fg, "iou")
        return F.per_class_pairwise_cost(labels, labels, self.num_classes, "iou")

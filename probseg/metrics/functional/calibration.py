"""Metrics of the mean prediction: expected calibration error, Dice and binarized Dice.

* :func:`expected_calibration_error` (Guo et al. 2017), pixel-wise and top-label: the prediction
  is the mean of the S hypotheses' class probabilities, its confidence the largest class
  probability, and a pixel is correct when its arg-max class equals the raters' majority vote
  (:func:`probseg.data.fusion.majority_vote`, ties to the lower class id). With ``num_bins``
  equal-width confidence bins (bin m holds [m/M, (m+1)/M), the last also holds 1):

  .. math:: \\mathrm{ECE} = \\sum_m \\frac{n_m}{N} \\, |\\mathrm{acc}_m - \\mathrm{conf}_m|

  computed per image (N = pixels of the image). :func:`calibration_statistics` gives the bins'
  sums behind it, so that the ECE can also be pooled over a dataset: the same formula with the
  bins filled by every pixel of every image (N = pixels of the dataset;
  :func:`calibration_error_from_bins` of the bins summed over images).
* :func:`dice_score`: the Dice score of the hard mean prediction (arg-max of the mean of the S
  hypotheses' class probabilities, ties to the lower class) against the raters' majority vote,
  one-vs-rest per foreground class 1..K-1 (both empty = 1) and averaged over them: the Dice of
  a deterministic model's segmentation, as the distillation experiments of Wang et al. report.
  :func:`dice_statistics` gives its counts, so that the Dice can also be pooled over a dataset:

  .. math:: \\mathrm{Dice}_{pooled} = \\frac{2 \\sum_i |P_i \\cap G_i|}{\\sum_i |P_i| + \\sum_i |G_i|}

  per foreground class over the images i (a class empty everywhere scores 1), averaged over the
  classes (:func:`dice_from_statistics` of the counts summed over images). The pooled values
  weigh every pixel of the dataset alike, the per-image means every image alike: an image with
  a small structure counts as much as one with a large structure in the mean, and little in the
  pooled value. Pooling is probseg's addition: Wang et al. (Sec. 3.3) "report the mean values in
  the aggregated validation set", the union of the cross-validation folds' validation sets, so
  their figures most likely correspond to the per-image :func:`dice_score` and
  :func:`expected_calibration_error` averaged over those images.
* :func:`binarized_dice` (BDice, QUBIQ's official metric; Wang et al., Sec. 3.3): the mean
  prediction and the raters' mean are both thresholded at 0.1, 0.2, ..., 0.9 (strictly greater
  than the threshold is foreground), Dice is computed at each level (both empty = 1) and
  averaged over the levels. The raters' mean is compared exactly (integer vote counts against a
  rational threshold), so 3 of 10 raters is never "above 0.3" by a rounding error.

:func:`mean_prediction_statistics` gives all three per image with the ECE bins and Dice counts,
computing the mean prediction and the majority vote once.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Sequence

import torch

from probseg._ops import (
    accumulation_dtype,
    check_probabilities,
    check_rater_mask,
    check_set,
    dice_from_overlap,
    foreground_overlap,
    majority_vote,
)

BDICE_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
"""QUBIQ's threshold levels."""


def class_probabilities(pred: torch.Tensor) -> torch.Tensor:
    """(B, S, H, W) foreground probabilities -> (B, S, 2, H, W); (B, S, K, H, W) is returned as is."""
    if pred.ndim == 4:
        return torch.stack([1 - pred, pred], dim=2)
    check_set(pred, "pred", rank=5)
    return pred


def _check_prediction(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if not isinstance(pred, torch.Tensor) or pred.ndim not in (4, 5):
        raise ValueError(
            "pred must be (B, S, H, W) foreground probabilities or (B, S, K, H, W) class probabilities, "
            f"got {tuple(getattr(pred, 'shape', ()))}"
        )
    check_set(target, "target")
    check_probabilities(pred, "pred")
    if pred.shape[0] != target.shape[0] or pred.shape[-2:] != target.shape[-2:]:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must share B, H and W")
    if target.is_floating_point():
        raise TypeError(f"target must hold integer class ids, got dtype {target.dtype}")
    probs = class_probabilities(pred)
    if int(target.max()) >= probs.shape[2] or int(target.min()) < 0:
        raise ValueError(f"target holds class ids outside [0, {probs.shape[2] - 1}]")
    return probs


def calibration_bins(confidence: torch.Tensor, correct: torch.Tensor, num_bins: int = 15) -> torch.Tensor:
    """Per-image reliability statistics.

    Args:
        confidence: (B, N) confidences in [0, 1].
        correct: (B, N) bool or 0/1.
        num_bins: M equal-width bins; bin m holds [m/M, (m+1)/M), the last also holds 1.

    Returns:
        (B, M, 3): pixel count, summed confidence and summed correctness of each bin.
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be positive, got {num_bins}")
    b, n = confidence.shape
    wide = accumulation_dtype(confidence.device)
    conf = confidence.to(wide)
    bins = (conf * num_bins).long().clamp_(0, num_bins - 1)
    flat = (bins + num_bins * torch.arange(b, device=bins.device)[:, None]).flatten()
    stats = torch.zeros(3, b * num_bins, dtype=wide, device=conf.device)
    stats[0].index_add_(0, flat, torch.ones_like(conf).flatten())
    stats[1].index_add_(0, flat, conf.flatten())
    stats[2].index_add_(0, flat, correct.to(wide).flatten())
    return stats.view(3, b, num_bins).permute(1, 2, 0)


def calibration_error_from_bins(stats: torch.Tensor) -> torch.Tensor:
    """ECE from reliability statistics: sum_m |correct_m - confidence_m| / sum_m n_m.

    Args:
        stats: (..., M, 3) pixel count, summed confidence and summed correctness per bin, as
            :func:`calibration_bins` gives them (one image) or their sum over images (pooled).

    Returns:
        (...) ECE in [0, 1]; NaN where no pixel was counted.
    """
    count, confidence, correct = stats.unbind(-1)
    return (correct - confidence).abs().sum(-1) / count.sum(-1)


def _mean_prediction(pred: torch.Tensor, target: torch.Tensor,
                     rater_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The checked mean of the S hypotheses' class probabilities (B, K, H, W) and the (B, R)
    present raters."""
    probs = _check_prediction(pred, target)
    return probs.mean(dim=1), check_rater_mask(rater_mask, target)


def _vote(mean: torch.Tensor, target: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """The raters' (B, H, W) majority vote, ties to the lower class."""
    return majority_vote(target, present, num_classes=mean.shape[1])


def _calibration_bins_of(mean: torch.Tensor, vote: torch.Tensor, num_bins: int) -> torch.Tensor:
    """(B, M, 3) reliability statistics of a (B, K, H, W) mean prediction against a vote."""
    confidence, label = mean.max(dim=1)
    return calibration_bins(confidence.flatten(1), (label == vote).flatten(1), num_bins)


def _dice_counts_of(mean: torch.Tensor, vote: torch.Tensor) -> torch.Tensor:
    """(B, K-1, 2) overlap counts of the arg-max of a (B, K, H, W) mean prediction and a vote."""
    label = mean.movedim(1, -1).contiguous().argmax(dim=-1)  # (B, H, W), ties to the lower class
    return foreground_overlap(label.flatten(1), vote.flatten(1), mean.shape[1], accumulation_dtype(mean.device))


def calibration_statistics(
    pred: torch.Tensor, target: torch.Tensor, rater_mask: torch.Tensor | None = None, num_bins: int = 15
) -> torch.Tensor:
    """Per-image reliability statistics of the mean prediction against the raters' majority vote.

    Args:
        pred: (B, S, H, W) foreground probabilities, or (B, S, K, H, W) class probabilities.
        target: (B, R, H, W) integer class ids.
        rater_mask: (B, R) bool; absent raters do not vote.
        num_bins: M.

    Returns:
        (B, M, 3): pixel count, summed top-label confidence and summed correctness of each bin
        (float64; float32 on devices without it). Summed over images they give the pooled ECE.
    """
    mean, present = _mean_prediction(pred, target, rater_mask)
    return _calibration_bins_of(mean, _vote(mean, target, present), num_bins)


def expected_calibration_error(
    pred: torch.Tensor, target: torch.Tensor, rater_mask: torch.Tensor | None = None, num_bins: int = 15
) -> torch.Tensor:
    """Pixel-wise top-label ECE of the mean prediction against the raters' majority vote.

    Args:
        pred, target, rater_mask, num_bins: as in :func:`calibration_statistics`.

    Returns:
        (B,) ECE per image, in [0, 1].
    """
    return calibration_error_from_bins(calibration_statistics(pred, target, rater_mask, num_bins)).to(pred.dtype)


def dice_statistics(pred: torch.Tensor, target: torch.Tensor, rater_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image overlap counts of the arg-max of the mean prediction and the raters' majority vote.

    Args:
        pred: (B, S, H, W) foreground probabilities, or (B, S, K, H, W) class probabilities.
        target: (B, R, H, W) integer class ids.
        rater_mask: (B, R) bool; absent raters do not vote.

    Returns:
        (B, K-1, 2): per foreground class, |P and G| and |P| + |G| (float64; float32 on devices
        without it). Summed over images they give the pooled Dice.
    """
    mean, present = _mean_prediction(pred, target, rater_mask)
    return _dice_counts_of(mean, _vote(mean, target, present))


def dice_from_statistics(counts: torch.Tensor) -> torch.Tensor:
    """(..., K-1, 2) counts of :func:`dice_statistics` (one image, or summed over images) ->
    (...) Dice averaged over the foreground classes (a class empty in both scores 1)."""
    return dice_from_overlap(counts)


def dice_score(pred: torch.Tensor, target: torch.Tensor, rater_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Dice of the arg-max of the mean prediction against the raters' majority vote.

    Args:
        pred, target, rater_mask: as in :func:`dice_statistics`.

    Returns:
        (B,) Dice per image, in [0, 1], averaged over the foreground classes (both empty = 1).
    """
    return dice_from_statistics(dice_statistics(pred, target, rater_mask)).to(pred.dtype)


def binarized_dice(
    pred: torch.Tensor,
    target: torch.Tensor,
    rater_mask: torch.Tensor | None = None,
    thresholds: Sequence[float] = BDICE_THRESHOLDS,
) -> torch.Tensor:
    """BDice: Dice of the thresholded mean prediction and rater mean, averaged over thresholds.

    Args:
        pred: (B, S, H, W) foreground probabilities, or (B, S, K, H, W) class probabilities
            (then BDice is averaged over the foreground classes 1..K-1, one-vs-rest).
        target: (B, R, H, W) integer class ids.
        rater_mask: (B, R) bool; absent raters are left out of the mean.
        thresholds: levels in (0, 1).

    Returns:
        (B,) BDice per image, in [0, 1].
    """
    mean, present = _mean_prediction(pred, target, rater_mask)
    _check_thresholds(thresholds)
    return _binarized_dice_of(mean, target, present, thresholds)


def _check_thresholds(thresholds: Sequence[float]) -> None:
    if not thresholds or not all(0 < t < 1 for t in thresholds):
        raise ValueError(f"thresholds must be a non-empty list of levels in (0, 1), got {thresholds}")


def _binarized_dice_of(mean: torch.Tensor, target: torch.Tensor, present: torch.Tensor,
                       thresholds: Sequence[float]) -> torch.Tensor:
    """(B,) BDice of a (B, K, H, W) mean prediction against the present raters' mean."""
    fractions = [Fraction(str(t)).limit_denominator(10**6) for t in thresholds]
    levels = torch.tensor([float(t) for t in thresholds], dtype=mean.dtype, device=mean.device)
    num = torch.tensor([f.numerator for f in fractions], device=mean.device)
    den = torch.tensor([f.denominator for f in fractions], device=mean.device)
    raters = present.sum(dim=1)  # (B,)
    flat = mean.flatten(2)  # (B, K, N)
    per_class = []
    for c in range(1, mean.shape[1]):
        votes = ((target == c) & present[:, :, None, None]).sum(dim=1).flatten(1)  # (B, N) integer counts
        fg_pred = flat[:, c, None, :] > levels[None, :, None]  # (B, T, N)
        # votes / raters > num / den  <=>  votes * den > num * raters (exact integers)
        fg_target = votes[:, None, :] * den[None, :, None] > (num[None, :] * raters[:, None])[:, :, None]
        inter = (fg_pred & fg_target).sum(dim=-1)
        total = fg_pred.sum(dim=-1) + fg_target.sum(dim=-1)
        wide = accumulation_dtype(total.device)
        dice = torch.where(total > 0, 2 * inter.to(wide) / total.clamp_min(1).to(wide), torch.ones_like(total, dtype=wide))
        per_class.append(dice.mean(dim=1))
    return torch.stack(per_class, dim=1).mean(dim=1).to(mean.dtype)


def mean_prediction_statistics(
    pred: torch.Tensor,
    target: torch.Tensor,
    rater_mask: torch.Tensor | None = None,
    num_bins: int = 15,
    thresholds: Sequence[float] = BDICE_THRESHOLDS,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """ECE, Dice and BDice per image and the statistics that pool the first two, from one mean
    prediction and one majority vote.

    Args:
        pred, target, rater_mask, num_bins: as in :func:`calibration_statistics`.
        thresholds: as in :func:`binarized_dice`.

    Returns:
        ``{ece, dice, bdice}``, (B,) each in ``pred``'s dtype (the values of
        :func:`expected_calibration_error`, :func:`dice_score` and :func:`binarized_dice`), and
        ``{ece, dice}``: the (B, M, 3) bins of :func:`calibration_statistics` and the (B, K-1, 2)
        counts of :func:`dice_statistics`.
    """
    mean, present = _mean_prediction(pred, target, rater_mask)
    _check_thresholds(thresholds)
    vote = _vote(mean, target, present)
    statistics = {"ece": _calibration_bins_of(mean, vote, num_bins), "dice": _dice_counts_of(mean, vote)}
    values = {
        "ece": calibration_error_from_bins(statistics["ece"]).to(pred.dtype),
        "dice": dice_from_statistics(statistics["dice"]).to(pred.dtype),
        "bdice": _binarized_dice_of(mean, target, present, thresholds),
    }
    return values, statistics

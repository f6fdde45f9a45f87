"""Set-to-set metrics between S sampled hypotheses and the R rater masks of an image.

* :func:`empirical_wasserstein` (Valiuddin et al., eq. 13, "Hungarian matching"): the exact
  optimal transport cost between the uniform empirical measures on the S predictions and the R
  raters, reported as the mean matched cost. When S is a multiple of R the raters are repeated
  S / R times and matched one-to-one by ``scipy.optimize.linear_sum_assignment`` (the paper's
  convention); otherwise both sets are replicated to lcm(S, R) members. Replication keeps the
  measures uniform, and an assignment is an optimal vertex of the transport polytope, so the
  result is the exact optimal transport cost in both cases. Above :data:`LP_ABOVE` replicated
  members the S x R transport linear program gives the same value directly.
* :func:`generalized_energy_distance` (Kohl et al. 2018), with d = 1 - IoU:

  .. math:: D^2_{GED} = 2\\,\\mathbb{E}[d(S, Y)] - \\mathbb{E}[d(S, S')] - \\mathbb{E}[d(Y, Y')]

  ``self_pairs=True`` (the default, as in the published PU-Net and PHiSeg evaluations) averages
  the within-set terms over all ordered pairs including i = j (whose distance is 0);
  ``self_pairs=False`` averages over distinct pairs only (the unbiased estimate; a set of one
  member then contributes 0).
* :func:`sample_diversity`: the within-set term E[d(S, S')] of the predictions.

Raters absent from an image (``rater_mask`` False) are left out of every term.

Weighted hypotheses (``sample_weight``, (B, S), e.g. a mixture of experts' samples): the
predictions' empirical measure puts mass w_i / sum(w) on hypothesis i instead of 1 / S. The
matched cost is then the exact optimal transport cost between that measure and the uniform
measure on the present raters (the S x R transport linear program; an assignment no longer
describes it), and every expectation of GED and diversity is weighted,

.. math:: \\mathbb{E}_w[d(S, S')] = \\frac{\\sum_{i, j} w_i w_j d_{ij}}{\\sum_{i, j} w_i w_j}

over the same pairs as unweighted (``self_pairs=False`` leaves i = j out of both sums). Uniform
weights give the unweighted values (the matching then takes the assignment path, the same
numbers exactly). Integer weights n_i give the values of the set where hypothesis i appears n_i
times for the matching and, with self-pairs, for GED and diversity; without self-pairs only i = j
is left out, so the copies of one hypothesis (at distance 0 from each other) are not counted.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from probseg._ops import check_rater_mask
from probseg.metrics.functional.kernels import CE_EPS, pairwise_cost


MATCHINGS = ("lcm", "tile", "rectangular")
"""How the Hungarian-matched metrics match S hypotheses with R raters when R does not divide S
(they agree when it does, except ``"rectangular"``):

* ``"lcm"`` (default): the exact optimal transport between the uniform measures (both sets
  replicated to lcm(S, R) members, or the transport LP);
* ``"tile"``: the cSAE paper's "duplicate the ground truth to the sample count": the raters
  repeated in order r_1 ... r_R r_1 ... and cut at S (some raters then count once more than
  others), matched one-to-one with the S hypotheses (when S < R, the hypotheses are tiled to R);
* ``"rectangular"``: the S x R cost matched as it is, min(S, R) pairs (each rater with a
  different hypothesis, the other hypotheses left out): it picks the best R of S hypotheses, so
  it is optimistic (lower than the other two), as in some peers' evaluations."""

LP_ABOVE = 1024
"""Replicated sets larger than this (coprime S and R, e.g. 100 and 97) are solved as the
S x R transport linear program instead of an lcm(S, R)-sized assignment: the same exact value
without a quadratic blow-up."""


def _transport_lp(cost: np.ndarray, row_mass: np.ndarray | None = None) -> float:
    """Exact optimal transport cost between the measures on the rows (``row_mass``, uniform when
    None) and the uniform measure on the columns of ``cost``."""
    from scipy.optimize import linprog

    s, r = cost.shape
    row_mass = np.full(s, 1 / s) if row_mass is None else row_mass
    rows = np.kron(np.eye(s), np.ones(r))  # sum_j P_ij = a_i
    cols = np.kron(np.ones(s), np.eye(r))  # sum_i P_ij = 1/R
    # The last equality is implied by the others (both measures have mass 1): dropping it keeps
    # the system full rank when the weights are rounded.
    result = linprog(cost.ravel(), A_eq=np.vstack([rows, cols])[:-1],
                     b_eq=np.r_[row_mass, np.full(r, 1 / r)][:-1], bounds=(0, None), method="highs")
    if not result.success:
        raise RuntimeError(f"the transport linear program failed: {result.message}")
    return float(result.fun)


def sample_weights(sample_weight: torch.Tensor | None, shape: tuple[int, int] | torch.Size,
                   name: str = "sample_weight", dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """The (B, S) hypothesis weights normalised to sum to 1 per image (in ``dtype``, default: the
    weights' floating dtype); None stays None.

    Raises a ValueError naming ``name`` for a wrong shape, a negative or non-finite weight, or an
    image whose weights are all 0.
    """
    if sample_weight is None:
        return None
    if not isinstance(sample_weight, torch.Tensor):
        raise TypeError(f"{name} must be a (B, S) tensor, got {type(sample_weight).__name__}")
    if tuple(sample_weight.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape (B, S) = {tuple(shape)}, got {tuple(sample_weight.shape)}")
    weight = sample_weight.to(dtype or (sample_weight.dtype if sample_weight.is_floating_point() else torch.float64))
    total = weight.sum(dim=1, keepdim=True)
    good = ((weight >= 0) & torch.isfinite(weight)).all(dim=1) & (total[:, 0] > 0)
    if not bool(good.all()):
        b = int((~good).nonzero()[0, 0])
        raise ValueError(f"{name} must be finite and non-negative with a positive sum per image; image {b} has "
                         f"{weight[b].tolist()}")
    return weight / total


def _tiled_matching(c: np.ndarray) -> float:
    """Mean one-to-one matched cost after tiling the smaller set to the larger one's size."""
    s, r = c.shape
    full = c[:, [j % r for j in range(s)]] if s >= r else c[[i % s for i in range(r)]]
    rows, cols = linear_sum_assignment(full)
    return float(full[rows, cols].mean())


def _rectangular_matching(c: np.ndarray) -> float:
    """Mean cost of the min(S, R) pairs of the rectangular assignment."""
    rows, cols = linear_sum_assignment(c)
    return float(c[rows, cols].mean())


def matched_cost(cost: torch.Tensor, rater_mask: torch.Tensor | None = None,
                 sample_weight: torch.Tensor | None = None, matching: str = "lcm") -> torch.Tensor:
    """Exact optimal transport cost between the predictions' and the raters' measures, from a
    pairwise cost.

    Args:
        cost: (B, S, R) cost of every (prediction, rater) pair.
        rater_mask: (B, R) bool, True where the rater annotated the image (None: all did).
        sample_weight: (B, S) non-negative weights of the predictions (None: uniform); see the
            module docstring. Only with ``matching="lcm"``.
        matching: one of :data:`MATCHINGS` (the convention when R does not divide S).

    Returns:
        (B,) mean matched cost, on ``cost``'s device and dtype; NaN for an image whose costs
        (of its present raters) hold NaN. Inf costs are refused.
    """
    if matching not in MATCHINGS:
        raise ValueError(f"matching must be one of {MATCHINGS}, got {matching!r}")
    if sample_weight is not None and matching != "lcm":
        raise ValueError(f"weighted hypotheses are matched by optimal transport only (matching='lcm'), got {matching!r}")
    if cost.ndim != 3:
        raise ValueError(f"cost must have shape (B, S, R), got {tuple(cost.shape)}")
    if bool(torch.isinf(cost).any()):
        raise ValueError("cost holds Inf")
    present = check_rater_mask(rater_mask, cost.transpose(1, 2)).cpu().numpy()
    weights = sample_weights(sample_weight, cost.shape[:2], dtype=torch.float64)
    weights = None if weights is None else weights.detach().cpu().numpy()
    costs = cost.detach().cpu().double().numpy()
    s = costs.shape[1]
    out = np.empty(costs.shape[0])
    for b, (c, keep) in enumerate(zip(costs, present)):
        c = c[:, keep]
        if np.isnan(c).any():  # an undefined pair cost (hausdorff_empty="nan"): no matched cost
            out[b] = math.nan
            continue
        r = c.shape[1]
        if matching != "lcm":
            out[b] = _tiled_matching(c) if matching == "tile" else _rectangular_matching(c)
            continue
        if weights is not None and not np.all(weights[b] == weights[b, 0]):
            out[b] = _transport_lp(c, weights[b])
            continue
        n = math.lcm(s, r)
        if n > LP_ABOVE:
            out[b] = _transport_lp(c)
            continue
        full = np.repeat(np.repeat(c, n // s, axis=0), n // r, axis=1)
        rows, cols = linear_sum_assignment(full)
        out[b] = full[rows, cols].mean()
    return torch.as_tensor(out).to(cost.device, cost.dtype)


def empirical_wasserstein(
    pred: torch.Tensor,
    target: torch.Tensor,
    kernel: str = "iou",
    rater_mask: torch.Tensor | None = None,
    *,
    eps: float = CE_EPS,
    sample_weight: torch.Tensor | None = None,
    matching: str = "lcm",
    ce_reading: str = "mean",
    hausdorff_empty: str = "diagonal",
) -> torch.Tensor:
    """Hungarian-matched empirical Wasserstein metric of each image.

    Args:
        pred: (B, S, H, W) binary masks (foreground probabilities for ``kernel="ce"``).
        target: (B, R, H, W) binary rater masks.
        kernel: "iou", "dice", "hausdorff" or "ce" (see :func:`pairwise_cost`).
        rater_mask: (B, R) bool; absent raters are left out.
        eps: probability clamp of the ``"ce"`` kernel.
        sample_weight: (B, S) weights of the hypotheses (None: uniform).
        matching: one of :data:`MATCHINGS`.
        ce_reading: the ``"ce"`` kernel's reading (:data:`~probseg.metrics.functional.kernels.CE_READINGS`).
        hausdorff_empty: the ``"hausdorff"`` kernel's distance to an empty mask
            (:data:`~probseg.metrics.functional.kernels.HAUSDORFF_EMPTY`; ``"nan"`` gives NaN for
            an image with such a pair).

    Returns:
        (B,) mean matched cost.
    """
    cost = pairwise_cost(pred, target, kernel, eps=eps, ce_reading=ce_reading, hausdorff_empty=hausdorff_empty)
    return matched_cost(cost, rater_mask, sample_weight, matching)


def set_mean(cost: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor, self_pairs: bool = True) -> torch.Tensor:
    """Weighted mean of a (B, N, M) pairwise cost, pair (i, j) weighing weight_a[i] weight_b[j]
    (0/1 weights keep or drop members; hypothesis weights make it an expectation).

    With ``self_pairs=False`` (a set against itself) the diagonal is left out, and a set of one
    member gives 0.
    """
    pair = weight_a[:, :, None] * weight_b[:, None, :]
    if not self_pairs:
        pair = pair * (1 - torch.eye(cost.shape[1], cost.shape[2], dtype=pair.dtype, device=pair.device))
    total = (cost * pair).sum(dim=(1, 2))
    count = pair.sum(dim=(1, 2))
    # (a safe denominator where no pair is kept: the weights may be fractions, so no clamp to 1)
    return torch.where(count > 0, total / torch.where(count > 0, count, torch.ones_like(count)), torch.zeros_like(total))


def generalized_energy_distance(
    pred: torch.Tensor,
    target: torch.Tensor,
    rater_mask: torch.Tensor | None = None,
    self_pairs: bool = True,
    sample_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Squared generalized energy distance with d = 1 - IoU (see the module docstring).

    Args:
        pred: (B, S, H, W) binary masks.
        target: (B, R, H, W) binary rater masks.
        rater_mask: (B, R) bool; absent raters are left out.
        self_pairs: include i = j in the within-set means (the published convention).
        sample_weight: (B, S) weights of the hypotheses (None: uniform).

    Returns:
        (B,) D^2_GED per image.
    """
    cross = pairwise_cost(pred, target, "iou")
    within_pred = pairwise_cost(pred, pred, "iou")
    within_target = pairwise_cost(target, target, "iou")
    return energy_distance_from_costs(cross, within_pred, within_target, rater_mask, self_pairs, sample_weight)


def energy_distance_from_costs(
    cross: torch.Tensor,
    within_pred: torch.Tensor,
    within_target: torch.Tensor,
    rater_mask: torch.Tensor | None = None,
    self_pairs: bool = True,
    sample_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """GED from precomputed distances: cross (B, S, R), within_pred (B, S, S), within_target
    (B, R, R); lets a caller reuse one IoU computation for several metrics."""
    weight_r = check_rater_mask(rater_mask, cross.transpose(1, 2)).to(cross.dtype)
    weight_s = _prediction_weights(sample_weight, cross)
    return (
        2 * set_mean(cross, weight_s, weight_r)
        - set_mean(within_pred, weight_s, weight_s, self_pairs)
        - set_mean(within_target, weight_r, weight_r, self_pairs)
    )


def sample_diversity(pred: torch.Tensor, self_pairs: bool = True,
                     sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean pairwise 1 - IoU among the S hypotheses of each image (the E[d(S, S')] of GED).

    Args:
        pred: (B, S, H, W) binary masks.
        self_pairs: include i = j (distance 0), as in GED's default.
        sample_weight: (B, S) weights of the hypotheses (None: uniform).

    Returns:
        (B,) diversity per image.
    """
    return diversity_from_costs(pairwise_cost(pred, pred, "iou"), self_pairs, sample_weight)


def diversity_from_costs(within: torch.Tensor, self_pairs: bool = True,
                         sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`sample_diversity` from precomputed (B, S, S) distances."""
    weight = _prediction_weights(sample_weight, within)
    return set_mean(within, weight, weight, self_pairs)


def _prediction_weights(sample_weight: torch.Tensor | None, cost: torch.Tensor) -> torch.Tensor:
    """(B, S) weights of the predictions indexing ``cost``'s second axis: ones when None."""
    weight = sample_weights(sample_weight, cost.shape[:2])
    if weight is None:
        return torch.ones(cost.shape[:2], dtype=cost.dtype, device=cost.device)
    return weight.to(device=cost.device, dtype=cost.dtype)

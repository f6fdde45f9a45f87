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
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from probseg._ops import check_rater_mask
from probseg.metrics.functional.kernels import CE_EPS, pairwise_cost


LP_ABOVE = 1024
"""Replicated sets larger than this (coprime S and R, e.g. 100 and 97) are solved as the
S x R transport linear program instead of an lcm(S, R)-sized assignment: the same exact value
without a quadratic blow-up."""


def _transport_lp(cost: np.ndarray) -> float:
    """Exact optimal transport cost between uniform measures on the rows and columns of ``cost``."""
    from scipy.optimize import linprog

    s, r = cost.shape
    rows = np.kron(np.eye(s), np.ones(r))  # sum_j P_ij = 1/S
    cols = np.kron(np.ones(s), np.eye(r))  # sum_i P_ij = 1/R
    result = linprog(cost.ravel(), A_eq=np.vstack([rows, cols]),
                     b_eq=np.r_[np.full(s, 1 / s), np.full(r, 1 / r)], bounds=(0, None), method="highs")
    if not result.success:
        raise RuntimeError(f"the transport linear program failed: {result.message}")
    return float(result.fun)


def matched_cost(cost: torch.Tensor, rater_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Exact optimal transport cost between uniform measures, from a pairwise cost.

    Args:
        cost: (B, S, R) cost of every (prediction, rater) pair.
        rater_mask: (B, R) bool, True where the rater annotated the image (None: all did).

    Returns:
        (B,) mean matched cost, on ``cost``'s device and dtype.
    """
    if cost.ndim != 3:
        raise ValueError(f"cost must have shape (B, S, R), got {tuple(cost.shape)}")
    if not bool(torch.isfinite(cost).all()):
        raise ValueError("cost holds NaN or Inf")
    present = check_rater_mask(rater_mask, cost.transpose(1, 2)).cpu().numpy()
    costs = cost.detach().cpu().double().numpy()
    s = costs.shape[1]
    out = np.empty(costs.shape[0])
    for b, (c, keep) in enumerate(zip(costs, present)):
        c = c[:, keep]
        r = c.shape[1]
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
) -> torch.Tensor:
    """Hungarian-matched empirical Wasserstein metric of each image.

    Args:
        pred: (B, S, H, W) binary masks (foreground probabilities for ``kernel="ce"``).
        target: (B, R, H, W) binary rater masks.
        kernel: "iou", "dice", "hausdorff" or "ce" (see :func:`pairwise_cost`).
        rater_mask: (B, R) bool; absent raters are left out.
        eps: probability clamp of the ``"ce"`` kernel.

    Returns:
        (B,) mean matched cost.
    """
    return matched_cost(pairwise_cost(pred, target, kernel, eps=eps), rater_mask)


def set_mean(cost: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor, self_pairs: bool = True) -> torch.Tensor:
    """Mean of a (B, N, M) pairwise cost over the pairs kept by 0/1 weights (B, N) and (B, M).

    With ``self_pairs=False`` (a set against itself) the diagonal is left out, and a set of one
    member gives 0.
    """
    pair = weight_a[:, :, None] * weight_b[:, None, :]
    if not self_pairs:
        pair = pair * (1 - torch.eye(cost.shape[1], cost.shape[2], dtype=pair.dtype, device=pair.device))
    total = (cost * pair).sum(dim=(1, 2))
    count = pair.sum(dim=(1, 2))
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


def generalized_energy_distance(
    pred: torch.Tensor,
    target: torch.Tensor,
    rater_mask: torch.Tensor | None = None,
    self_pairs: bool = True,
) -> torch.Tensor:
    """Squared generalized energy distance with d = 1 - IoU (see the module docstring).

    Args:
        pred: (B, S, H, W) binary masks.
        target: (B, R, H, W) binary rater masks.
        rater_mask: (B, R) bool; absent raters are left out.
        self_pairs: include i = j in the within-set means (the published convention).

    Returns:
        (B,) D^2_GED per image.
    """
    cross = pairwise_cost(pred, target, "iou")
    within_pred = pairwise_cost(pred, pred, "iou")
    within_target = pairwise_cost(target, target, "iou")
    return energy_distance_from_costs(cross, within_pred, within_target, rater_mask, self_pairs)


def energy_distance_from_costs(
    cross: torch.Tensor,
    within_pred: torch.Tensor,
    within_target: torch.Tensor,
    rater_mask: torch.Tensor | None = None,
    self_pairs: bool = True,
) -> torch.Tensor:
    """GED from precomputed distances: cross (B, S, R), within_pred (B, S, S), within_target
    (B, R, R); lets a caller reuse one IoU computation for several metrics."""
    weight_r = check_rater_mask(rater_mask, cross.transpose(1, 2)).to(cross.dtype)
    weight_s = torch.ones(cross.shape[:2], dtype=cross.dtype, device=cross.device)
    return (
        2 * set_mean(cross, weight_s, weight_r)
        - set_mean(within_pred, weight_s, weight_s, self_pairs)
        - set_mean(within_target, weight_r, weight_r, self_pairs)
    )


def sample_diversity(pred: torch.Tensor, self_pairs: bool = True) -> torch.Tensor:
    """Mean pairwise 1 - IoU among the S hypotheses of each image (the E[d(S, S')] of GED).

    Args:
        pred: (B, S, H, W) binary masks.
        self_pairs: include i = j (distance 0), as in GED's default.

    Returns:
        (B,) diversity per image.
    """
    within = pairwise_cost(pred, pred, "iou")
    weight = torch.ones(within.shape[:2], dtype=within.dtype, device=within.device)
    return set_mean(within, weight, weight, self_pairs)

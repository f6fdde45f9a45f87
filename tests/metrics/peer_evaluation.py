"""Independent re-statements of what the peers' released LIDC evaluation code computes for ONE
image: the generalized energy distance (GED, d = 1 - IoU) and the Hungarian-matched IoU (HM-IoU).

Written from the definitions the peers' code implements, in plain python loops over pairs (no
code taken from the peers, and nothing from ``probseg.metrics``), so that
``test_peer_conventions.py`` can show which probseg options give the same numbers.

Inputs: ``samples`` (S, H, W) and ``raters`` (R, H, W) binary masks of the foreground class of one
image (LIDC: one foreground class, so the peers' per-class averages are over that one class).
Every peer here reports D^2_GED (no square root) per image and averages it over the test images;
the averaging and the number of hypotheses are part of the peers' evaluation scripts, not of
these per-image functions, and are stated in each docstring.

How the peers score a pair of masks (the "IoU rule"):

============  ==========================  ===================  ==================================
peer          both masks empty            one mask empty       otherwise
============  ==========================  ===================  ==================================
PHiSeg        IoU 1 (distance 0)          IoU 0 (distance 1)   |A & B| / |A | B|
MoSE          (0 + e) / (0 + e) = 1       e / (|A | B| + e)    (|A & B| + e) / (|A | B| + e),
                                                               e = 1e-8 (at most 1e-8 from exact)
CCDM          0 / 0 replaced by IoU 1     IoU 0                |A & B| / |A | B|
Flow-SSN      IoU 1 (total area 0)        IoU 0                |A & B| / |A | B|
"quirk"       distance 1                  distance 1           1 - |A & B| / |A | B|
============  ==========================  ===================  ==================================
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import linear_sum_assignment, linprog

MOSE_EPS = 1e-8
"""Smoothing constant MoSE adds to the intersection and the union of every pair."""


# ----------------------------------------------------------------------------- pair rules


def _counts(a: np.ndarray, b: np.ndarray) -> tuple[int, int, int, int]:
    """|A|, |B|, |A & B|, |A | B| of two binary masks."""
    a, b = np.asarray(a).astype(bool), np.asarray(b).astype(bool)
    return int(a.sum()), int(b.sum()), int((a & b).sum()), int((a | b).sum())


def phiseg_distance(a: np.ndarray, b: np.ndarray) -> float:
    """PHiSeg's rule, tested case by case: both empty -> IoU 1, exactly one empty -> IoU 0,
    else the Jaccard index; distance = 1 - IoU."""
    size_a, size_b, inter, union = _counts(a, b)
    if size_a == 0 and size_b == 0:
        iou = 1.0
    elif size_a == 0 or size_b == 0:
        iou = 0.0
    else:
        iou = inter / union
    return 1.0 - iou


def mose_distance(a: np.ndarray, b: np.ndarray, eps: float = MOSE_EPS) -> float:
    """MoSE's smoothed rule: 1 - (|A & B| + eps) / (|A | B| + eps) with no case split (both empty:
    distance 0; one empty: 1 - eps / (|A | B| + eps), within eps of 1)."""
    _, _, inter, union = _counts(a, b)
    return 1.0 - (inter + eps) / (union + eps)


def ccdm_distance(a: np.ndarray, b: np.ndarray) -> float:
    """CCDM's rule: the Jaccard index of the foreground class, an undefined 0 / 0 (both empty)
    read as IoU 1; distance = 1 - IoU (one empty: IoU 0, distance 1)."""
    _, _, inter, union = _counts(a, b)
    iou = 1.0 if union == 0 else inter / union
    return 1.0 - iou


def flowssn_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Flow-SSN's single-class rule: intersection over union, set to 1 where the summed area
    |A| + |B| is 0; distance = 1 - IoU."""
    size_a, size_b, inter, union = _counts(a, b)
    iou = 1.0 if size_a + size_b == 0 else inter / union
    return 1.0 - iou


def both_empty_one_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The quirk of some PyTorch / numpy GED ports: 1 - |A & B| / |A | B|, but a pair of two
    EMPTY masks gets distance 1 (the worst), so even an empty mask is at distance 1 from itself."""
    _, _, inter, union = _counts(a, b)
    return 1.0 if union == 0 else 1.0 - inter / union


def _matrix(first: np.ndarray, second: np.ndarray, dist) -> np.ndarray:
    """(len(first), len(second)) distances, one call per pair."""
    out = np.zeros((len(first), len(second)))
    for i in range(len(first)):
        for j in range(len(second)):
            out[i, j] = dist(first[i], second[j])
    return out


def _mean_over_all_pairs(first: np.ndarray, second: np.ndarray, dist) -> float:
    """Mean distance over every ordered pair (i, j) of the two sets (i = j included when they are
    the same set)."""
    total = 0.0
    for a in first:
        for b in second:
            total += dist(a, b)
    return total / (len(first) * len(second))


def _uniform_energy(samples: np.ndarray, raters: np.ndarray, dist) -> float:
    """2 E d(S, Y) - E d(S, S') - E d(Y, Y'), every expectation over all ordered pairs."""
    return (2 * _mean_over_all_pairs(samples, raters, dist)
            - _mean_over_all_pairs(samples, samples, dist)
            - _mean_over_all_pairs(raters, raters, dist))


def _transport_cost(cost: np.ndarray, row_mass: np.ndarray, col_mass: np.ndarray) -> float:
    """Exact optimal transport cost between two discrete measures (the masses each sum to 1) by
    a linear program over the S x R transport plan."""
    s, r = cost.shape
    equalities, targets = [], []
    for i in range(s):  # what leaves hypothesis i
        row = np.zeros((s, r))
        row[i, :] = 1
        equalities.append(row.ravel())
        targets.append(row_mass[i])
    for j in range(r - 1):  # what reaches rater j (the last one follows from the totals)
        col = np.zeros((s, r))
        col[:, j] = 1
        equalities.append(col.ravel())
        targets.append(col_mass[j])
    res = linprog(cost.ravel(), A_eq=np.array(equalities), b_eq=np.array(targets), bounds=(0, None), method="highs")
    if res.status != 0:
        raise RuntimeError(res.message)
    return float(res.fun)


# ----------------------------------------------------------------------------- PHiSeg


def phiseg_ged(samples: np.ndarray, raters: np.ndarray) -> float:
    """PHiSeg's D^2_GED of one image.

    Follows baumgach/PHiSeg-code ``utils.generalised_energy_distance`` as called by
    ``phiseg_test_quantitative.py`` (nlabels=1, label_range=range(1, 2); samples = argmax of the
    softmax). Conventions: the three means run over ALL ordered pairs, i = j included (self-pairs,
    distance 0); pair rule :func:`phiseg_distance` (both empty: 0, one empty: 1); uniform weights;
    all R = 4 LIDC raters, empty ones included. The script draws 50 samples per test image and
    reports the plain mean over the test images (np.mean of the per-image values).
    """
    return _uniform_energy(samples, raters, phiseg_distance)


# ----------------------------------------------------------------------------- MoSE


def _mose_weights(sample_weight: np.ndarray | None, s: int) -> np.ndarray:
    return np.full(s, 1.0 / s) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)


def mose_ged(samples: np.ndarray, raters: np.ndarray, sample_weight: np.ndarray | None = None) -> float:
    """MoSE's D^2_GED of one image.

    Follows gaozhitong/MoSE-AUSeg ``utils/metrics.py`` (``cal_metrics_batch``), called from
    ``models/MoSE.py`` with the argmax masks and ``data/lidc_dataset.py``'s uniform rater
    probabilities 1/R. Conventions: every expectation is the weighted sum over ALL ordered pairs,
    self-pairs included: E d(S, Y) = sum_ij w_i v_j d_ij, E d(S, S') = sum_ij w_i w_j d_ij,
    E d(Y, Y') = sum_ij v_i v_j d_ij with v_j = 1/R; the weights are used as given (MoSE's sum to 1:
    None here means uniform 1/S). Pair rule :func:`mose_distance` (smoothed with eps = 1e-8).

    Hypotheses: by default (``eval_sample_num=None``) the "weighted" form, 16 = 4 experts x 4
    samples, sample i weighted by its expert's gating probability / 4; the README's table uses
    16 samples drawn in the standard way (uniform weights). The test loop averages the metric per
    batch of 4 images and then over batches (``engine.py``, drop_last=False): the plain mean over
    images only when the test-set size is a multiple of 4.
    """
    w = _mose_weights(sample_weight, len(samples))
    v = np.full(len(raters), 1.0 / len(raters))
    cross = sum(w[i] * v[j] * mose_distance(samples[i], raters[j])
                for i in range(len(samples)) for j in range(len(raters)))
    within_s = sum(w[i] * w[j] * mose_distance(samples[i], samples[j])
                   for i in range(len(samples)) for j in range(len(samples)))
    within_r = sum(v[i] * v[j] * mose_distance(raters[i], raters[j])
                   for i in range(len(raters)) for j in range(len(raters)))
    return 2 * cross - within_s - within_r


def mose_hm_iou(samples: np.ndarray, raters: np.ndarray, sample_weight: np.ndarray | None = None) -> float:
    """MoSE's matched IoU ("M-IoU") of one image.

    Follows gaozhitong/MoSE-AUSeg ``utils/metrics.py`` (``cal_metrics_batch``, ``ret_h_score``).
    Conventions: the cost is :func:`mose_distance` for every (sample, rater) pair. When the sample
    and rater weights are all equal AND R divides S, the raters are repeated S / R times
    (r_1 ... r_R r_1 ... r_R ...) and matched one-to-one with the S samples by the Hungarian
    algorithm; the score is the mean of 1 - cost over the S matched pairs. Otherwise (weighted
    samples, or R not dividing S) it is sum_ij P_ij (1 - c_ij) for the exact optimal transport plan
    P between the normalised sample weights and the uniform rater weights (``ot.emd``), i.e.
    1 - the optimal transport cost. Both branches are the exact optimal transport between the two
    measures. Sample count and averaging as in :func:`mose_ged`.
    """
    s, r = len(samples), len(raters)
    cost = _matrix(samples, raters, mose_distance)
    w = _mose_weights(sample_weight, s)
    uniform = bool(np.all(w == w[0]))
    if uniform and s % r == 0:
        repeated = np.concatenate([cost] * (s // r), axis=1)  # columns r_1..r_R, r_1..r_R, ...
        rows, cols = linear_sum_assignment(repeated)
        return float(np.mean(1.0 - repeated[rows, cols]))
    plan_cost = _transport_cost(cost, w / w.sum(), np.full(r, 1.0 / r))
    return 1.0 - plan_cost


# ----------------------------------------------------------------------------- CCDM


def ccdm_ged(samples: np.ndarray, raters: np.ndarray) -> float:
    """CCDM's D^2_GED of one image.

    Follows LarsDoorenbos/ccdm-stochastic-segmentation ``evaluation/evaluate_lidc_uncertainty.py``
    (``calc_batched_generalised_energy_distance``; the same functions in
    ``evaluate_lidc_sampling_speed.py``). Conventions: one-hot class maps, per-class IoU averaged
    over the foreground classes (LIDC: class 1 only); means over ALL ordered pairs, self-pairs
    included; uniform weights; pair rule :func:`ccdm_distance` (0 / 0 -> IoU 1). All 4 raters per
    image. The script evaluates the first n of the drawn samples for each n in the list
    ``params["evaluations"]`` (the released ``params_eval.yml`` holds a single integer, 8, which
    this LIDC path cannot iterate) and reports sum over images / number of test images.
    """
    return _uniform_energy(samples, raters, ccdm_distance)


def ccdm_hm_iou(samples: np.ndarray, raters: np.ndarray) -> float:
    """CCDM's HM-IoU of one image.

    Follows LarsDoorenbos/ccdm-stochastic-segmentation ``evaluation/evaluate_lidc_uncertainty.py``
    (``batched_hungarian_matching`` after ``repeat_interleave``). Conventions: with L = lcm(S, R),
    every rater is repeated L / R times and every sample L / S times (each copy next to its
    original), the L x L cost of :func:`ccdm_distance` is matched one-to-one by the Hungarian
    algorithm and the score is the mean of 1 - cost over the L pairs: the exact optimal transport
    between the uniform measures.
    """
    s, r = len(samples), len(raters)
    n = math.lcm(s, r)
    rep_raters = [raters[j] for j in range(r) for _ in range(n // r)]
    rep_samples = [samples[i] for i in range(s) for _ in range(n // s)]
    cost = _matrix(rep_raters, rep_samples, ccdm_distance)
    rows, cols = linear_sum_assignment(cost)
    return float(np.mean(1.0 - cost[rows, cols]))


# ----------------------------------------------------------------------------- Flow-SSN


def flowssn_ged(samples: np.ndarray, raters: np.ndarray) -> float:
    """Flow-SSN's D^2_GED of one image.

    Follows biomedia-mira/flow-ssn ``flowssn/eval/metrics.py`` (``energy_distance`` with
    ``weights=None``, as called by ``eval_batch`` in ``flowssn/train.py``; foreground channel only,
    ``filter_bg=[1]``). Conventions: means over ALL ordered pairs, self-pairs included; uniform
    weights; pair rule :func:`flowssn_distance` (both empty: 0, one empty: 1). All raters of the
    image. The final test run sets ``eval_samples = 100``; the reported value is the sum over the
    test images of the non-NaN per-image values / their count (the plain per-image mean).
    """
    return _uniform_energy(samples, raters, flowssn_distance)


def flowssn_hm_iou(samples: np.ndarray, raters: np.ndarray) -> float:
    """Flow-SSN's HM-IoU of one image.

    Follows biomedia-mira/flow-ssn ``flowssn/eval/metrics.py`` (``hungarian_matched_iou``).
    Conventions: the S x R cost of :func:`flowssn_distance` is given as it is (rectangular, no
    replication) to the Hungarian algorithm, which pairs each rater with a different sample and
    leaves the other S - R samples out; the score is the mean of 1 - cost over those min(S, R)
    pairs (100 samples against 4 raters in the test run: the best 4 of 100). Images whose cost
    holds a NaN are skipped (none do for binary masks). Averaging as in :func:`flowssn_ged`.
    """
    cost = _matrix(samples, raters, flowssn_distance)
    rows, cols = linear_sum_assignment(cost)
    return float(np.mean(1.0 - cost[rows, cols]))


# ----------------------------------------------------------------------------- the both-empty quirk


def both_empty_one_ged(samples: np.ndarray, raters: np.ndarray) -> float:
    """D^2_GED with the "both empty = distance 1" pair rule (:func:`both_empty_one_distance`).

    Found in ``src/metrics.py`` of mcosarinsky/Conformal-In-Context-RCA (a PyTorch PHiSeg /
    PU-Net port: ``pairwise_jaccard_distance`` sets the distance of a pair with an empty union to
    1) and in two more stored copies (a torch one and a numpy one, repository not named by the
    index). Means over all ordered pairs, self-pairs included, uniform weights. Those functions
    return the SQUARE ROOT of this value (D_GED, not D^2_GED).

    With e_S empty samples of S and e_R empty raters of R, every empty-empty pair adds 1 to the
    usual distance, so the value is exactly  GED - (e_S / S - e_R / R)^2  (GED with both-empty
    distance 0, self-pairs included): lower than the usual GED whenever the two sets have
    different empty fractions.
    """
    return _uniform_energy(samples, raters, both_empty_one_distance)

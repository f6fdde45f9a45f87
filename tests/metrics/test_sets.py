"""Set metrics: ``matched_cost`` / ``empirical_wasserstein`` against brute-force permutations and a
scipy ``linprog`` optimal-transport LP; GED and sample diversity against the definition with python
loops and a hand-computed 1x4-pixel example."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from probseg.metrics.functional import (
    empirical_wasserstein,
    generalized_energy_distance,
    matched_cost,
    sample_diversity,
)
from tests.metrics._reference import mixed_masks, perturbed, ref_cost, ref_ged, ref_ot_lp, ref_within
from tests.tolerances import gamma, unit_roundoff


def set_metric_bound(s: int, r: int) -> float:
    """Float32 rounding bound of GED = 2 E d(S, Y) - E d(S, S') - E d(Y, Y') (and of a diversity),
    with d = 1 - IoU in [0, 1] from exact pixel counts (one division and one subtraction each).

    Each mean sums at most max(S, R)^2 values (gamma_n of the sum, whatever order the CPU adds
    them in) and divides once; doubling, two subtractions and the rounding of each d add a few u.
    """
    u = unit_roundoff(torch.float32)
    n = max(s, r) ** 2
    return 4 * (gamma(n, torch.float32) + 3 * u) + 6 * u


def brute_force_matching(cost: np.ndarray) -> float:
    """Min over all permutations of the mean matched cost between lcm(S, R) replicas: sample i
    repeated n/S times, rater j repeated n/R times."""
    s, r = cost.shape
    n = math.lcm(s, r)
    rows = [i for i in range(s) for _ in range(n // s)]
    cols = [j for j in range(r) for _ in range(n // r)]
    full = cost[np.ix_(rows, cols)]
    perms = np.array(list(itertools.permutations(range(n))))
    return float(full[perms, np.arange(n)].mean(axis=1).min())


def _costs(seed: int, b: int, s: int, r: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cost = rng.random((b, s, r))
    cost[0] = rng.integers(0, 3, (s, r))  # ties
    return cost


# ----------------------------------------------------------------------------- matched cost


@pytest.mark.parametrize("s,r", [(1, 1), (2, 2), (4, 2), (6, 3), (6, 2), (6, 6), (6, 1), (3, 2), (2, 3), (4, 8)])
def test_matched_cost_equals_brute_force_permutations(s: int, r: int) -> None:
    """lcm(S, R) <= 8: every permutation of the replicated sets is enumerated."""
    cost = _costs(s * 10 + r, 4, s, r)
    got = matched_cost(torch.as_tensor(cost)).numpy()
    np.testing.assert_allclose(got, [brute_force_matching(c) for c in cost], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("s,r", [(3, 2), (4, 6), (5, 3), (2, 7), (7, 4), (6, 4), (1, 5), (5, 1)])
def test_matched_cost_equals_transport_lp(s: int, r: int) -> None:
    """The mean matched cost is the optimal transport cost with marginals 1/S and 1/R (linprog)."""
    cost = _costs(s * 10 + r + 1, 5, s, r)
    got = matched_cost(torch.as_tensor(cost)).numpy()
    np.testing.assert_allclose(got, [ref_ot_lp(c) for c in cost], rtol=1e-9, atol=1e-9)


def test_matched_cost_by_hand() -> None:
    """S = 2, R = 1: both samples go to the rater -> plain mean. S = 1, R = 2: mean over raters.
    S = R = 2 with costs [[0, 1], [1, 0]]: the identity matching, 0. S = 3, R = 2 ([[0, 9], [9, 0],
    [1, 2]]): samples 0 and 1 take 1/3 to their own rater, sample 2 splits 1/6 + 1/6 -> (1 + 2) / 6."""
    assert matched_cost(torch.tensor([[[0.2], [0.6]]], dtype=torch.float64)).item() == pytest.approx(0.4)
    assert matched_cost(torch.tensor([[[0.2, 0.6]]], dtype=torch.float64)).item() == pytest.approx(0.4)
    assert matched_cost(torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])).item() == pytest.approx(0.0)
    c = torch.tensor([[[0.0, 9.0], [9.0, 0.0], [1.0, 2.0]]], dtype=torch.float64)
    assert matched_cost(c).item() == pytest.approx(0.5)


def test_matched_cost_rater_mask_leaves_absent_raters_out() -> None:
    """Per image, the result equals the LP / brute force on the present columns only, and equals
    calling on the subset of present raters."""
    rng = np.random.default_rng(4)
    b, s, r = 5, 4, 5
    cost = rng.random((b, s, r))
    mask = rng.random((b, r)) < 0.6
    mask[np.arange(b), rng.integers(0, r, b)] = True
    mask[0] = [True, False, False, False, False]
    got = matched_cost(torch.as_tensor(cost), torch.as_tensor(mask)).numpy()
    for i in range(b):
        expect = ref_ot_lp(cost[i][:, mask[i]])
        assert got[i] == pytest.approx(expect, abs=1e-9)
        alone = matched_cost(torch.as_tensor(cost[i : i + 1][:, :, mask[i]])).item()
        assert got[i] == pytest.approx(alone, abs=1e-12)
    # an absent rater with a tiny cost must not lower the result
    c = torch.tensor([[[0.5, 0.0]]], dtype=torch.float64)
    assert matched_cost(c, torch.tensor([[True, False]])).item() == pytest.approx(0.5)


def test_matched_cost_keeps_dtype() -> None:
    c = torch.rand(2, 3, 2)
    assert matched_cost(c).dtype == torch.float32
    assert matched_cost(c.double()).dtype == torch.float64


@pytest.mark.parametrize(
    "cost,mask,match",
    [
        (torch.zeros(3, 2), None, "shape"),
        (torch.tensor([[[float("inf")]]]), None, "Inf"),
        (torch.zeros(2, 3, 2), torch.ones(2, 3, dtype=torch.bool), "rater_mask"),
        (torch.zeros(2, 3, 2), torch.tensor([[True, False], [False, False]]), "at least one rater"),
    ],
)
def test_matched_cost_errors(cost, mask, match) -> None:
    with pytest.raises(ValueError, match=match):
        matched_cost(cost, mask)


@pytest.mark.parametrize("matching", ["lcm", "tile", "rectangular"])
def test_matched_cost_is_nan_only_for_images_with_an_undefined_pair(matching: str) -> None:
    """A NaN pair cost (Hausdorff to an empty mask under hausdorff_empty="nan") makes that
    image's matched cost NaN; the other images keep their values; an absent rater's NaN is
    ignored."""
    torch.manual_seed(0)
    cost = torch.rand(3, 4, 3, dtype=torch.float64)
    expect = matched_cost(cost, matching=matching)
    cost[1, 2, 0] = float("nan")
    cost[2, 0, 2] = float("nan")
    present = torch.tensor([[True, True, True], [True, True, True], [True, True, False]])
    got = matched_cost(cost, present, matching=matching)
    assert torch.isnan(got[1]) and not torch.isnan(got[[0, 2]]).any()
    torch.testing.assert_close(got[0], expect[0])
    torch.testing.assert_close(got[2], matched_cost(cost[2:, :, :2], matching=matching)[0])


# ----------------------------------------------------------------------------- empirical Wasserstein


def _sets(seed: int, b: int, s: int, r: int, h: int = 16, w: int = 18) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    target = mixed_masks(rng, (b, r, h, w))
    pred = mixed_masks(rng, (b, s, h, w))
    for i in range(b):
        for j in range(s // 2):
            pred[i, j] = perturbed(rng, target[i, int(rng.integers(r))], 0.05)
    return pred, target


@pytest.mark.parametrize("kernel", ["iou", "dice", "hausdorff", "ce"])
@pytest.mark.parametrize("s,r", [(4, 2), (3, 2), (4, 6), (5, 3)])
def test_empirical_wasserstein_equals_lp_on_brute_force_costs(kernel: str, s: int, r: int) -> None:
    """Brute-force pair costs (numpy / scipy) fed to the transport LP."""
    pred, target = _sets(s * 7 + r, 3, s, r)
    if kernel == "ce":
        rng = np.random.default_rng(0)
        pred = np.clip(pred * 0.8 + rng.random(pred.shape) * 0.2, 0, 1)
        pred[0, 0] = 0.0
    got = empirical_wasserstein(torch.as_tensor(pred), torch.as_tensor(target), kernel).double().numpy()
    costs = ref_cost(pred, target, kernel)
    np.testing.assert_allclose(got, [ref_ot_lp(c) for c in costs], rtol=1e-5, atol=1e-5)


def test_empirical_wasserstein_rater_mask_equals_subset_call() -> None:
    """Absent raters left out: same as computing each image on its present raters only."""
    pred, target = _sets(21, 4, 4, 4)
    mask = np.array([[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 1], [0, 1, 1, 1]], bool)
    for kernel in ("iou", "hausdorff"):
        got = empirical_wasserstein(torch.as_tensor(pred), torch.as_tensor(target), kernel, torch.as_tensor(mask))
        for i in range(4):
            sub = torch.as_tensor(target[i : i + 1, mask[i]])
            alone = empirical_wasserstein(torch.as_tensor(pred[i : i + 1]), sub, kernel).item()
            # the same pair costs; the matched mean is float64, rounded once to float32 on each side
            assert got[i].item() == pytest.approx(alone, rel=4 * unit_roundoff(torch.float32), abs=1e-12)
            assert got[i].item() == pytest.approx(ref_ot_lp(ref_cost(pred[i : i + 1], target[i : i + 1, mask[i]], kernel)[0]), abs=1e-5)


def test_empirical_wasserstein_identical_sets_is_zero() -> None:
    """S = 2R where the samples are the raters twice over: the matched cost is 0 for every kernel."""
    _, target = _sets(8, 2, 2, 3)
    pred = np.concatenate([target, target[:, ::-1]], axis=1)
    for kernel in ("iou", "dice", "hausdorff"):
        got = empirical_wasserstein(torch.as_tensor(pred), torch.as_tensor(target), kernel)
        assert torch.allclose(got, torch.zeros(2), atol=1e-6)


# ----------------------------------------------------------------------------- GED / diversity


@pytest.mark.parametrize("self_pairs", [True, False])
@pytest.mark.parametrize("s,r", [(4, 3), (1, 4), (3, 1), (5, 5), (16, 4), (100, 4)])  # 16 and 100: the common counts
def test_ged_matches_definition(s: int, r: int, self_pairs: bool) -> None:
    """2 E d(S, Y) - E d(S, S') - E d(Y, Y') with d = 1 - IoU, python loops over pairs."""
    pred, target = _sets(s * 3 + r, 3, s, r)
    got = generalized_energy_distance(torch.as_tensor(pred), torch.as_tensor(target), self_pairs=self_pairs)
    assert got.shape == (3,)
    expect = [ref_ged(pred[i], target[i], None, self_pairs) for i in range(3)]
    np.testing.assert_allclose(got.double().numpy(), expect, rtol=0, atol=set_metric_bound(s, r))


@pytest.mark.parametrize("self_pairs", [True, False])
def test_ged_rater_mask(self_pairs: bool) -> None:
    """Absent raters leave every term; equals the loop on present raters and the subset call."""
    pred, target = _sets(31, 4, 3, 4)
    mask = np.array([[1, 1, 1, 1], [1, 0, 0, 1], [0, 0, 1, 0], [1, 1, 0, 1]], bool)
    got = generalized_energy_distance(torch.as_tensor(pred), torch.as_tensor(target), torch.as_tensor(mask), self_pairs)
    for i in range(4):
        assert got[i].item() == pytest.approx(ref_ged(pred[i], target[i], mask[i], self_pairs), abs=set_metric_bound(3, 4))
        alone = generalized_energy_distance(
            torch.as_tensor(pred[i : i + 1]), torch.as_tensor(target[i : i + 1, mask[i]]), self_pairs=self_pairs
        )
        # masked batch vs subset call: other tensor widths, so possibly another order of the sums
        assert got[i].item() == pytest.approx(alone.item(), abs=2 * set_metric_bound(3, 4))


def _row(*pixels: int) -> np.ndarray:
    return np.array(pixels, bool).reshape(1, 4)


def test_ged_and_diversity_by_hand_on_1x4_images() -> None:
    """S = {1100, 0110}, Y = {1100, 0001}. d(S1, Y1) = 0, d(S1, Y2) = 1, d(S2, Y1) = 2/3, d(S2, Y2) = 1,
    d(S1, S2) = 2/3, d(Y1, Y2) = 1. Cross mean = 2/3.
    self_pairs: E d(S, S') = (2/3 + 2/3) / 4 = 1/3, E d(Y, Y') = 2 / 4 = 1/2 -> GED = 4/3 - 1/3 - 1/2 = 1/2.
    distinct pairs: 2/3 and 1 -> GED = 4/3 - 2/3 - 1 = -1/3.
    rater 2 absent: cross = 1/3, within Y = 0 -> GED = 2/3 - 1/3 = 1/3 (self) and 2/3 - 2/3 = 0 (distinct)."""
    pred = torch.as_tensor(np.stack([_row(1, 1, 0, 0), _row(0, 1, 1, 0)])[None])
    target = torch.as_tensor(np.stack([_row(1, 1, 0, 0), _row(0, 0, 0, 1)])[None])
    absent = torch.tensor([[True, False]])
    tol = set_metric_bound(2, 2)
    assert generalized_energy_distance(pred, target).item() == pytest.approx(1 / 2, abs=tol)
    assert generalized_energy_distance(pred, target, self_pairs=False).item() == pytest.approx(-1 / 3, abs=tol)
    assert generalized_energy_distance(pred, target, absent).item() == pytest.approx(1 / 3, abs=tol)
    assert generalized_energy_distance(pred, target, absent, self_pairs=False).item() == pytest.approx(0.0, abs=tol)
    assert sample_diversity(pred).item() == pytest.approx(1 / 3, abs=tol)
    assert sample_diversity(pred, self_pairs=False).item() == pytest.approx(2 / 3, abs=tol)


def test_ged_of_identical_sets_with_self_pairs_is_zero() -> None:
    """Same set on both sides: with self pairs 2 E d(S, Y) = E d(S, S') + E d(Y, Y') exactly."""
    _, target = _sets(40, 3, 2, 4)
    got = generalized_energy_distance(torch.as_tensor(target), torch.as_tensor(target))
    assert torch.allclose(got, torch.zeros(3), rtol=0, atol=set_metric_bound(4, 4))


@pytest.mark.parametrize("self_pairs", [True, False])
@pytest.mark.parametrize("s", [1, 2, 5])
def test_sample_diversity_matches_definition(s: int, self_pairs: bool) -> None:
    """Mean 1 - IoU over ordered pairs of samples (a single sample gives 0)."""
    pred, _ = _sets(50 + s, 3, s, 1)
    got = sample_diversity(torch.as_tensor(pred), self_pairs)
    expect = [ref_within(list(pred[i]), self_pairs) for i in range(3)]
    np.testing.assert_allclose(got.double().numpy(), expect, rtol=0, atol=set_metric_bound(s, s))
    if s == 1:
        assert (got == 0).all()


def test_large_coprime_sets_use_the_transport_lp_with_the_same_value() -> None:
    """S = 37, R = 31: lcm 1147 is above LP_ABOVE, so the S x R linear program answers; it must
    equal the assignment on the replicated sets (computed here with scipy directly)."""
    from scipy.optimize import linear_sum_assignment

    from probseg.metrics.functional.sets import LP_ABOVE

    rng = np.random.default_rng(3)
    cost = rng.random((2, 37, 31))
    n = math.lcm(37, 31)
    assert n > LP_ABOVE
    got = matched_cost(torch.from_numpy(cost))
    for b in range(2):
        full = np.repeat(np.repeat(cost[b], n // 37, axis=0), n // 31, axis=1)
        rows, cols = linear_sum_assignment(full)
        assert got[b].item() == pytest.approx(full[rows, cols].mean(), abs=1e-9)


@pytest.mark.parametrize(
    ("rater_mask", "exc", "match"),
    [
        ([[True, True]], TypeError, "bool tensor"),
        (torch.tensor([[0.5, 1.0]]), ValueError, "binary"),
        (torch.tensor([[False, False]]), ValueError, "at least one rater"),
        (torch.ones(1, 3, dtype=torch.bool), ValueError, r"\(B, R\)"),
    ],
)
def test_rater_mask_errors(rater_mask, exc, match) -> None:
    cost = torch.rand(1, 4, 2)
    with pytest.raises(exc, match=match):
        matched_cost(cost, rater_mask)


# ----------------------------------------------------------------------------- weighted hypotheses


def _integer_weights(seed: int, b: int, s: int) -> np.ndarray:
    """(B, S) positive integer weights, so a weighted set equals a set with repeats."""
    weights = np.random.default_rng(seed).integers(1, 4, (b, s))
    weights[0, 0] = 0 if s > 1 else 1  # a hypothesis without mass
    return weights


def _repeat(members: np.ndarray, counts: np.ndarray) -> np.ndarray:
    return np.repeat(members, counts, axis=0)


@pytest.mark.parametrize("s,r", [(2, 2), (3, 2), (4, 3), (5, 4), (1, 3)])
def test_weighted_matched_cost_equals_matching_of_the_repeated_set(s: int, r: int) -> None:
    """Integer weights n_i: the weighted optimal transport cost is the uniform one of the set
    where hypothesis i appears n_i times (brute force on the replicated sets)."""
    cost = _costs(s * 7 + r, 4, s, r)
    weights = _integer_weights(s + r, 4, s)
    got = matched_cost(torch.as_tensor(cost), sample_weight=torch.as_tensor(weights, dtype=torch.float32)).numpy()
    expect = [ref_ot_lp(_repeat(c, w)) for c, w in zip(cost, weights)]
    np.testing.assert_allclose(got, expect, rtol=1e-9, atol=1e-9)


def test_weighted_matched_cost_with_uniform_weights_is_the_unweighted_value_exactly() -> None:
    cost = torch.as_tensor(_costs(3, 5, 6, 4))
    weights = torch.full((5, 6), 0.25)  # unnormalised, uniform
    assert torch.equal(matched_cost(cost, sample_weight=weights), matched_cost(cost))


def test_weighted_matched_cost_by_hand() -> None:
    """Two hypotheses, one rater of cost 0 for the first: weights (0.9, 0.1) -> 0.1 * c_2."""
    cost = torch.tensor([[[0.0], [1.0]]], dtype=torch.float64)
    got = matched_cost(cost, sample_weight=torch.tensor([[0.9, 0.1]], dtype=torch.float64))
    assert got.item() == pytest.approx(0.1, abs=1e-12)


@pytest.mark.parametrize("self_pairs", [True, False])
def test_weighted_ged_and_diversity_are_the_weighted_expectations(self_pairs: bool) -> None:
    """Against python loops of sum_ij w_i w_j d_ij / sum_ij w_i w_j (i = j left out of both sums
    without self-pairs); with self-pairs, integer weights equal the repeated set."""
    rng = np.random.default_rng(5)
    b, s, r, h, w = 3, 4, 3, 8, 8
    pred = rng.random((b, s, h, w)) > 0.6
    target = rng.random((b, r, h, w)) > 0.6
    weights = _integer_weights(2, b, s).astype(float)
    got_ged = generalized_energy_distance(torch.as_tensor(pred), torch.as_tensor(target), self_pairs=self_pairs,
                                          sample_weight=torch.as_tensor(weights))
    got_div = sample_diversity(torch.as_tensor(pred), self_pairs, sample_weight=torch.as_tensor(weights))
    from tests.metrics._reference import ref_iou

    for i in range(b):
        wi = weights[i] / weights[i].sum()
        pairs = [(a, c) for a in range(s) for c in range(s) if self_pairs or a != c]
        norm = sum(wi[a] * wi[c] for a, c in pairs)
        within = sum(wi[a] * wi[c] * ref_iou(pred[i, a], pred[i, c]) for a, c in pairs) / norm
        cross = sum(wi[a] * ref_iou(pred[i, a], target[i, j]) for a in range(s) for j in range(r)) / r
        rpairs = [(a, c) for a in range(r) for c in range(r) if self_pairs or a != c]
        within_t = sum(ref_iou(target[i, a], target[i, c]) for a, c in rpairs) / len(rpairs)
        assert got_div[i].item() == pytest.approx(within, abs=1e-6)
        assert got_ged[i].item() == pytest.approx(2 * cross - within - within_t, abs=1e-6)
        if self_pairs:
            counts = weights[i].astype(int)
            assert got_ged[i].item() == pytest.approx(ref_ged(_repeat(pred[i], counts), target[i]), abs=1e-6)


def test_weighted_ged_with_uniform_weights_equals_unweighted() -> None:
    rng = np.random.default_rng(6)
    pred = torch.as_tensor(rng.random((2, 5, 8, 8)) > 0.5)
    target = torch.as_tensor(rng.random((2, 3, 8, 8)) > 0.5)
    for self_pairs in (True, False):
        torch.testing.assert_close(
            generalized_energy_distance(pred, target, self_pairs=self_pairs, sample_weight=torch.ones(2, 5)),
            generalized_energy_distance(pred, target, self_pairs=self_pairs), atol=set_metric_bound(5, 3), rtol=0)


@pytest.mark.parametrize(
    ("weight", "match"),
    [
        (torch.ones(1, 3), r"\(B, S\)"),
        (torch.tensor([[1.0, -1.0, 1.0, 1.0]]), "non-negative"),
        (torch.zeros(1, 4), "positive sum"),
        (torch.tensor([[1.0, float("nan"), 1.0, 1.0]]), "finite"),
        ([[1.0] * 4], "tensor"),
    ],
)
def test_sample_weight_errors(weight, match) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        matched_cost(torch.rand(1, 4, 2), sample_weight=weight)


def test_sample_weight_error_names_the_image() -> None:
    weight = torch.ones(3, 4)
    weight[2, 1] = -0.5
    with pytest.raises(ValueError, match=r"image 2 has \[1.0, -0.5, 1.0, 1.0\]"):
        matched_cost(torch.rand(3, 4, 2), sample_weight=weight)


# ----------------------------------------------------------------------------- matching conventions


def brute_force_tiled(cost: np.ndarray) -> float:
    """The raters repeated in order and cut at S (or the hypotheses at R), every permutation."""
    s, r = cost.shape
    n = max(s, r)
    rows = [i % s for i in range(n)]
    cols = [j % r for j in range(n)]
    full = cost[np.ix_(rows, cols)]
    return min(full[list(p), np.arange(n)].mean() for p in itertools.permutations(range(n)))


def brute_force_rectangular(cost: np.ndarray) -> float:
    """Every injective map from the smaller set into the larger one."""
    s, r = cost.shape
    if s >= r:
        return min(np.mean([cost[p[j], j] for j in range(r)]) for p in itertools.permutations(range(s), r))
    return min(np.mean([cost[i, p[i]] for i in range(s)]) for p in itertools.permutations(range(r), s))


@pytest.mark.parametrize("s,r", [(4, 2), (5, 3), (6, 4), (3, 3), (2, 3), (7, 4)])
def test_matching_conventions_equal_brute_force(s: int, r: int) -> None:
    cost = _costs(s * 13 + r, 3, s, r)
    t = torch.as_tensor(cost)
    np.testing.assert_allclose(matched_cost(t, matching="tile").numpy(), [brute_force_tiled(c) for c in cost], atol=1e-12)
    rect = matched_cost(t, matching="rectangular").numpy()
    np.testing.assert_allclose(rect, [brute_force_rectangular(c) for c in cost], atol=1e-12)
    exact = matched_cost(t).numpy()
    assert (rect <= exact + 1e-12).all(), "the rectangular matching picks the best raters' partners: optimistic"
    if s % r == 0:  # the raters tile exactly: the cSAE paper's convention is the optimal transport
        np.testing.assert_allclose(matched_cost(t, matching="tile").numpy(), exact, atol=1e-12)


def test_tiling_weighs_the_first_raters_more_when_r_does_not_divide_s() -> None:
    """S = 4, R = 3: raters 1, 2, 3, 1, so rater 1 counts twice; a hypothesis set that fits
    rater 1 only scores better under "tile" than under the exact optimal transport."""
    cost = torch.tensor([[[0.0, 1.0, 1.0]] * 4], dtype=torch.float64)
    assert matched_cost(cost, matching="tile").item() == pytest.approx(0.5)
    assert matched_cost(cost).item() == pytest.approx(2 / 3)
    assert matched_cost(cost, matching="rectangular").item() == pytest.approx(2 / 3)


def test_matching_option_errors() -> None:
    with pytest.raises(ValueError, match="matching must be one of"):
        matched_cost(torch.rand(1, 4, 2), matching="greedy")
    with pytest.raises(ValueError, match="optimal transport only"):
        matched_cost(torch.rand(1, 4, 2), sample_weight=torch.ones(1, 4), matching="tile")

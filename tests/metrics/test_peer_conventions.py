"""Peers' numbers reproduced (issue 19, item 5): for each peer's released LIDC evaluation, the
probseg options that give the same per-image GED and Hungarian-matched IoU.

The peers' computations are re-stated independently in ``peer_evaluation.py`` (python loops over
pairs, scipy's assignment / LP); here they are compared with probseg's functionals on random
16 x 16 sets (S in {4, 6, 16} hypotheses, R in {3, 4} raters: R does not always divide S), with
empty hypotheses and raters, all-empty sets, and MoSE's weighted hypotheses.

=========  ===============================================  =========================================
peer       GED                                              HM-IoU (= 1 - matched cost)
=========  ===============================================  =========================================
PHiSeg     ``generalized_energy_distance(self_pairs=True)``  (none in its released evaluation)
MoSE       same, ``sample_weight`` = its sample weights      ``empirical_wasserstein(matching="lcm",
                                                            sample_weight=...)``
CCDM       ``generalized_energy_distance(self_pairs=True)``  ``matching="lcm"``
Flow-SSN   ``generalized_energy_distance(self_pairs=True)``  ``matching="rectangular"``
=========  ===============================================  =========================================

Not reproduced by any probseg option (so no equality test): the "both empty = distance 1" pair
rule of some GED ports (``both_empty_one_ged``); its exact relation to probseg's GED is tested.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probseg.metrics.functional import (
    empirical_wasserstein,
    generalized_energy_distance,
)
from tests.metrics import peer_evaluation as peer
from tests.metrics._reference import blob_mask, mixed_masks, perturbed

TOL = 1e-6
H = W = 16

# (S, R, which masks are empty)
CASES = [
    (4, 3, "some"),
    (4, 4, "some"),
    (6, 3, "none"),
    (6, 4, "some"),
    (16, 3, "some"),
    (16, 4, "some"),
    (4, 3, "raters_empty"),
    (6, 4, "samples_empty"),
    (16, 4, "all_empty"),
]
SEEDS = [0, 1]


def make_sets(seed: int, s: int, r: int, empty: str) -> tuple[np.ndarray, np.ndarray]:
    """(S, H, W) hypotheses and (R, H, W) raters of one image: perturbed copies of a common blob
    (so IoUs are spread over [0, 1]) mixed with unrelated masks (which may be empty by chance, even
    with ``empty="none"``), then the chosen masks emptied."""
    rng = np.random.default_rng(1000 * seed + 10 * s + r)
    base = blob_mask(rng, H, W)
    raters = np.stack([perturbed(rng, base, 0.05) for _ in range(r)])
    samples = np.stack([perturbed(rng, base, rng.uniform(0.02, 0.2)) for _ in range(s)])
    samples[s // 2:] = np.where(rng.random((s - s // 2, 1, 1)) < 0.5, mixed_masks(rng, (s - s // 2, H, W)),
                                samples[s // 2:])
    if empty == "some":
        samples[rng.choice(s, size=max(1, s // 4), replace=False)] = False
        raters[rng.integers(r)] = False
    elif empty == "raters_empty":
        raters[:] = False
        samples[0] = False
    elif empty == "samples_empty":
        samples[:] = False
        raters[0] = False
    elif empty == "all_empty":
        samples[:] = False
        raters[:] = False
    return samples, raters


def mose_expert_weights(seed: int, s: int) -> np.ndarray:
    """MoSE's weighted form: K experts with gating probabilities g_k, each drawing S / K samples
    of weight g_k / (S / K) (expert-major order); K = 4 when it divides S, else one weight per
    sample."""
    rng = np.random.default_rng(seed + 77)
    k = 4 if s % 4 == 0 else s
    gates = rng.dirichlet(np.full(k, 0.7))
    return np.repeat(gates / (s // k), s // k)


def _set(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=bool))[None]


def probseg_ged(samples: np.ndarray, raters: np.ndarray, **options) -> float:
    if "sample_weight" in options:
        options["sample_weight"] = torch.as_tensor(options["sample_weight"], dtype=torch.float64)[None]
    return float(generalized_energy_distance(_set(samples), _set(raters), **options)[0])


def probseg_matched_iou(samples: np.ndarray, raters: np.ndarray, **options) -> float:
    if "sample_weight" in options:
        options["sample_weight"] = torch.as_tensor(options["sample_weight"], dtype=torch.float64)[None]
    return 1.0 - float(empirical_wasserstein(_set(samples), _set(raters), "iou", **options)[0])


case_params = pytest.mark.parametrize("seed", SEEDS)
set_params = pytest.mark.parametrize("s,r,empty", CASES)


# ----------------------------------------------------------------------------- pair rules


def test_pair_rules_on_empty_masks() -> None:
    """The peers' IoU rules where they differ: two empty masks, one empty mask."""
    empty = np.zeros((4, 4), dtype=bool)
    blob = empty.copy()
    blob[1:3, 1:3] = True  # 4 pixels
    for rule in (peer.phiseg_distance, peer.ccdm_distance, peer.flowssn_distance, peer.mose_distance):
        assert rule(empty, empty) == 0.0
        assert rule(blob, blob) == 0.0
    for rule in (peer.phiseg_distance, peer.ccdm_distance, peer.flowssn_distance):
        assert rule(empty, blob) == 1.0
    assert peer.mose_distance(empty, blob) == pytest.approx(1 - 1e-8 / 4, abs=1e-15)
    assert peer.both_empty_one_distance(empty, empty) == 1.0
    assert peer.both_empty_one_distance(empty, blob) == 1.0


# ----------------------------------------------------------------------------- PHiSeg


@case_params
@set_params
def test_phiseg_ged_is_self_pairs_ged(seed: int, s: int, r: int, empty: str) -> None:
    samples, raters = make_sets(seed, s, r, empty)
    assert probseg_ged(samples, raters, self_pairs=True) == pytest.approx(peer.phiseg_ged(samples, raters), abs=TOL)


# ----------------------------------------------------------------------------- MoSE


@case_params
@set_params
def test_mose_ged_is_self_pairs_ged(seed: int, s: int, r: int, empty: str) -> None:
    """Standard sampling (uniform weights); the eps = 1e-8 smoothing moves a pair by < 1e-8."""
    samples, raters = make_sets(seed, s, r, empty)
    assert probseg_ged(samples, raters, self_pairs=True) == pytest.approx(peer.mose_ged(samples, raters), abs=TOL)


@case_params
@set_params
def test_mose_weighted_ged_is_weighted_ged(seed: int, s: int, r: int, empty: str) -> None:
    samples, raters = make_sets(seed, s, r, empty)
    w = mose_expert_weights(seed, s)
    assert probseg_ged(samples, raters, self_pairs=True, sample_weight=w) == pytest.approx(
        peer.mose_ged(samples, raters, sample_weight=w), abs=TOL)


@case_params
@set_params
def test_mose_matched_iou_is_lcm(seed: int, s: int, r: int, empty: str) -> None:
    """Uniform weights: raters repeated S / R times when R divides S, exact transport otherwise."""
    samples, raters = make_sets(seed, s, r, empty)
    assert probseg_matched_iou(samples, raters, matching="lcm") == pytest.approx(
        peer.mose_hm_iou(samples, raters), abs=TOL)


@case_params
@set_params
def test_mose_weighted_matched_iou_is_weighted_transport(seed: int, s: int, r: int, empty: str) -> None:
    samples, raters = make_sets(seed, s, r, empty)
    w = mose_expert_weights(seed, s)
    assert probseg_matched_iou(samples, raters, matching="lcm", sample_weight=w) == pytest.approx(
        peer.mose_hm_iou(samples, raters, sample_weight=w), abs=TOL)


# ----------------------------------------------------------------------------- CCDM


@case_params
@set_params
def test_ccdm_ged_is_self_pairs_ged(seed: int, s: int, r: int, empty: str) -> None:
    samples, raters = make_sets(seed, s, r, empty)
    assert probseg_ged(samples, raters, self_pairs=True) == pytest.approx(peer.ccdm_ged(samples, raters), abs=TOL)


@case_params
@set_params
def test_ccdm_hm_iou_is_lcm(seed: int, s: int, r: int, empty: str) -> None:
    samples, raters = make_sets(seed, s, r, empty)
    assert probseg_matched_iou(samples, raters, matching="lcm") == pytest.approx(
        peer.ccdm_hm_iou(samples, raters), abs=TOL)


# ----------------------------------------------------------------------------- Flow-SSN


@case_params
@set_params
def test_flowssn_ged_is_self_pairs_ged(seed: int, s: int, r: int, empty: str) -> None:
    samples, raters = make_sets(seed, s, r, empty)
    assert probseg_ged(samples, raters, self_pairs=True) == pytest.approx(peer.flowssn_ged(samples, raters), abs=TOL)


@case_params
@set_params
def test_flowssn_hm_iou_is_rectangular(seed: int, s: int, r: int, empty: str) -> None:
    samples, raters = make_sets(seed, s, r, empty)
    assert probseg_matched_iou(samples, raters, matching="rectangular") == pytest.approx(
        peer.flowssn_hm_iou(samples, raters), abs=TOL)


# ----------------------------------------------------------------------------- the options matter


def test_other_options_do_not_reproduce_the_peers() -> None:
    """On these sets the neighbouring options give other numbers: without self-pairs GED is
    smaller than the peers' (their within-set means include the zero diagonal, so they are
    smaller and GED larger), and when R does not
    divide S Flow-SSN's rectangular matching is above (never below) CCDM's / MoSE's exact
    transport, and ``tile`` is a third value."""
    gaps = {"self_pairs": 0.0, "rect_vs_lcm": 0.0, "tile_vs_lcm": 0.0}
    for seed in SEEDS:
        for s, r, empty in CASES:
            samples, raters = make_sets(seed, s, r, empty)
            without = probseg_ged(samples, raters, self_pairs=False)
            assert without <= peer.phiseg_ged(samples, raters) + TOL
            gaps["self_pairs"] = max(gaps["self_pairs"], peer.phiseg_ged(samples, raters) - without)
            rect, lcm = peer.flowssn_hm_iou(samples, raters), peer.ccdm_hm_iou(samples, raters)
            assert rect >= lcm - TOL
            if s % r:
                gaps["rect_vs_lcm"] = max(gaps["rect_vs_lcm"], rect - lcm)
                gaps["tile_vs_lcm"] = max(gaps["tile_vs_lcm"],
                                          abs(probseg_matched_iou(samples, raters, matching="tile") - lcm))
    assert all(gap > 1e-3 for gap in gaps.values()), gaps


# ----------------------------------------------------------------------------- the both-empty quirk


def test_both_empty_quirk_hand_example() -> None:
    """Samples {empty, A}, raters {A}: the usual GED is 2 (1/2) - (2/4) - 0 = 1/2; with both-empty
    distance 1 the empty sample's self-pair adds 1/4 to E d(S, S'), giving 1/4."""
    a = np.zeros((4, 4), dtype=bool)
    a[:2, :2] = True
    samples, raters = np.stack([np.zeros_like(a), a]), a[None]
    assert peer.phiseg_ged(samples, raters) == pytest.approx(0.5, abs=1e-12)
    assert probseg_ged(samples, raters) == pytest.approx(0.5, abs=TOL)
    assert peer.both_empty_one_ged(samples, raters) == pytest.approx(0.25, abs=1e-12)


@case_params
@set_params
def test_both_empty_quirk_is_ged_minus_squared_empty_fraction_gap(seed: int, s: int, r: int, empty: str) -> None:
    """No probseg option gives the quirk; its exact relation to probseg's (self-pairs) GED:
    GED_quirk = GED - (e_S / S - e_R / R)^2, e = the number of empty masks of each set."""
    samples, raters = make_sets(seed, s, r, empty)
    empty_s = np.mean([not m.any() for m in samples])
    empty_r = np.mean([not m.any() for m in raters])
    expected = probseg_ged(samples, raters, self_pairs=True) - (empty_s - empty_r) ** 2
    assert peer.both_empty_one_ged(samples, raters) == pytest.approx(expected, abs=TOL)

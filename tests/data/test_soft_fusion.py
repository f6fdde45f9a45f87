"""Rater fusion (fuse_raters, rater_weights, majority_vote) on hand-made rater sets whose expected
maps and Dice weights are written out by hand."""

from __future__ import annotations

import pytest
import torch

from probseg.data import FUSIONS, fuse_raters, majority_vote, rater_weights

# 1 image, 4 raters, a 1x4 image, K = 2 (class-1 masks):
#   r0 = [1, 1, 0, 0], r1 = [1, 0, 0, 0], r2 = [1, 1, 1, 0], r3 = [0, 1, 1, 1]
# votes for class 1: [3, 3, 2, 1] of 4 -> majority [1, 1, 0, 0] (pixel 2 is a 2-2 tie -> class 0)
BINARY = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1]]).view(1, 4, 1, 4)
# Dice of class 1 against the vote [1, 1, 0, 0]: r0 2*2/4 = 1, r1 2*1/3 = 2/3, r2 2*2/5 = 4/5,
# r3 2*1/5 = 2/5; sum 43/15 -> weights [15, 10, 12, 6] / 43
BINARY_WEIGHTS = [15 / 43, 10 / 43, 12 / 43, 6 / 43]

# 1 image, 3 raters, a 2x3 image, K = 3:
#   r0 = [[0, 1, 2], [2, 2, 1]], r1 = [[0, 1, 1], [2, 0, 1]], r2 = [[1, 2, 1], [0, 1, 2]]
# pixel (1, 1) is a three-way tie 2 / 0 / 1 -> class 0
MULTI = torch.tensor([[[0, 1, 2], [2, 2, 1]], [[0, 1, 1], [2, 0, 1]], [[1, 2, 1], [0, 1, 2]]]).unsqueeze(0)
MULTI_VOTE = [[0, 1, 1], [2, 0, 1]]
MULTI_MEAN = [  # class k at each pixel: the share of raters saying k
    [[2 / 3, 0, 0], [1 / 3, 1 / 3, 0]],
    [[1 / 3, 2 / 3, 2 / 3], [0, 1 / 3, 2 / 3]],
    [[0, 1 / 3, 1 / 3], [2 / 3, 1 / 3, 1 / 3]],
]
# Dice against the vote, mean over classes 1 and 2 (flat vote [0, 1, 1, 2, 0, 1]):
#   r0: class 1 2*2/5 = 4/5, class 2 2*1/4 = 1/2 -> 13/20; r1 == vote -> 1;
#   r2: class 1 2*1/6 = 1/3, class 2 0 -> 1/6.  Sum 109/60 -> [39, 60, 10] / 109
MULTI_WEIGHTS = [39 / 109, 60 / 109, 10 / 109]


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def binary_map(class1) -> torch.Tensor:
    """(1, 2, 1, 4) map from the class-1 row."""
    c1 = t(class1).view(1, 1, 1, 4)
    return torch.cat([1 - c1, c1], dim=1)


def close(a, b, tol=1e-6) -> None:
    torch.testing.assert_close(a.float(), torch.as_tensor(b, dtype=torch.float32), rtol=tol, atol=tol)


# --- deterministic fusions, by hand ---------------------------------------------------------------


def test_majority_binary_ties_to_background() -> None:
    close(fuse_raters(BINARY, method="majority"), binary_map([1, 1, 0, 0]))
    assert majority_vote(BINARY).tolist() == [[[1, 1, 0, 0]]]


def test_majority_tie_goes_to_the_lower_class_id() -> None:
    """Two raters saying 2 and 1 (either order): class 1; 2 vs 0: class 0."""
    masks = torch.tensor([[[[2, 1, 2]], [[1, 2, 0]]]])  # (1, 2, 1, 3)
    assert majority_vote(masks, num_classes=3).tolist() == [[[1, 1, 0]]]


def test_mean_binary() -> None:
    close(fuse_raters(BINARY, method="mean"), binary_map([3 / 4, 3 / 4, 2 / 4, 1 / 4]))


def test_weighted_mean_binary() -> None:
    """Class 1 = sum of the weights of the raters saying 1: [37, 33, 18, 6] / 43."""
    close(rater_weights(BINARY, None, 2), [BINARY_WEIGHTS])
    close(fuse_raters(BINARY, method="weighted_mean"), binary_map([37 / 43, 33 / 43, 18 / 43, 6 / 43]))


def test_multiclass_majority_and_mean() -> None:
    assert majority_vote(MULTI, num_classes=3).tolist() == [MULTI_VOTE]
    close(fuse_raters(MULTI, num_classes=3, method="majority"),
          torch.nn.functional.one_hot(torch.tensor([MULTI_VOTE]), 3).movedim(-1, 1))
    close(fuse_raters(MULTI, num_classes=3, method="mean"), [MULTI_MEAN])


def test_multiclass_weighted_mean() -> None:
    close(rater_weights(MULTI, None, 3), [MULTI_WEIGHTS])
    w0, w1, w2 = MULTI_WEIGHTS
    # pixel (0, 0): r0 = 0, r1 = 0, r2 = 1 -> [w0 + w1, w2, 0]; pixel (1, 0): 2, 2, 0 -> [w2, 0, w0 + w1]
    out = fuse_raters(MULTI, num_classes=3, method="weighted_mean")
    close(out[0, :, 0, 0], [w0 + w1, w2, 0])
    close(out[0, :, 1, 0], [w2, 0, w0 + w1])
    close(out[0, :, 1, 1], [w1, w2, w0])  # r0 = 2, r1 = 0, r2 = 1


def test_weights_class_empty_in_rater_and_vote_scores_one() -> None:
    """K = 3, r0 = [1, 1, 0], r1 = [1, 0, 0], r2 = [2, 1, 0]; vote [1, 1, 0] has no class 2.
    Class 1 Dice: 1, 2/3, 2/3; class 2: r0, r1 empty in both -> 1, r2 -> 0.
    Means 1, 5/6, 1/3 -> weights [6, 5, 2] / 13."""
    masks = torch.tensor([[1, 1, 0], [1, 0, 0], [2, 1, 0]]).view(1, 3, 1, 3)
    close(rater_weights(masks, None, 3), [[6 / 13, 5 / 13, 2 / 13]])


def test_weights_fall_back_to_uniform_when_every_rater_scores_zero() -> None:
    """Each rater marks a different pixel: the vote is all background, every Dice is 0."""
    masks = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1]]).view(1, 3, 1, 3)
    close(rater_weights(masks, None, 2), [[1 / 3, 1 / 3, 1 / 3]])
    close(fuse_raters(masks, method="weighted_mean")[0, 1, 0], [1 / 3, 1 / 3, 1 / 3])
    present = torch.tensor([[True, True, False]])  # vote of r0, r1: ties -> background; Dice 0
    close(rater_weights(masks, present, 2), [[0.5, 0.5, 0.0]])


# --- rater_mask -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["majority", "mean", "weighted_mean"])
def test_absent_raters_never_count(method: str) -> None:
    """Masking r2 out equals fusing r0, r1, r3 alone; batch of two images with different masks."""
    masks = torch.cat([BINARY, BINARY.flip(1)])  # image 1: raters in reverse order
    rater_mask = torch.tensor([[True, True, False, True], [True, False, True, True]])
    out = fuse_raters(masks, rater_mask, method=method)
    for b in range(2):
        subset = masks[b : b + 1, rater_mask[b]]
        close(out[b : b + 1], fuse_raters(subset, method=method))


def test_absent_raters_hand_values() -> None:
    """Without r2: votes for class 1 [2, 2, 1, 1] of 3 -> majority [1, 1, 0, 0], mean [2, 2, 1, 1] / 3;
    Dice vs the vote: r0 1, r1 2/3, r3 2/5 -> weights [15, 10, 0, 6] / 31."""
    rater_mask = torch.tensor([[True, True, False, True]])
    close(fuse_raters(BINARY, rater_mask, method="majority"), binary_map([1, 1, 0, 0]))
    close(fuse_raters(BINARY, rater_mask, method="mean"), binary_map([2 / 3, 2 / 3, 1 / 3, 1 / 3]))
    close(rater_weights(BINARY, rater_mask, 2), [[15 / 31, 10 / 31, 0, 6 / 31]])
    close(fuse_raters(BINARY, rater_mask, method="weighted_mean"), binary_map([25 / 31, 21 / 31, 6 / 31, 6 / 31]))


@pytest.mark.parametrize("method", ["random", "label_smoothing"])
def test_random_methods_only_draw_present_raters(method: str) -> None:
    """r2's mask [1, 1, 1, 0] is the only one with pixel 2 = 1 and pixel 0 = 1: masked out, never drawn."""
    rater_mask = torch.tensor([[True, True, False, True]])
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(60):
        out = fuse_raters(BINARY, rater_mask, method=method, smoothing=0.0, generator=g)
        seen.add(tuple(out[0, 1, 0].tolist()))
    assert seen == {(1.0, 1.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0), (0.0, 1.0, 1.0, 1.0)}


# --- random and label smoothing -------------------------------------------------------------------


def test_random_is_one_rater_one_hot_and_reproducible() -> None:
    """Each draw is the one-hot map of one rater; every rater comes up; same seed, same draws."""
    def draws(seed):
        g = torch.Generator().manual_seed(seed)
        return [fuse_raters(BINARY, method="random", generator=g) for _ in range(80)]

    first, again = draws(3), draws(3)
    counts = [0] * 4
    for a, b in zip(first, again):
        assert torch.equal(a, b)
        hits = [r for r in range(4) if torch.equal(a, binary_map(BINARY[0, r, 0].tolist()))]
        assert len(hits) == 1
        counts[hits[0]] += 1
    assert min(counts) >= 8  # ~20 expected each


def test_label_smoothing_values() -> None:
    """(1 - eps) one_hot + eps / K: K = 3 with all raters equal [0, 2, 1], eps = 0.3 ->
    0.7 + 0.1 = 0.8 on the rater's class, 0.1 elsewhere."""
    masks = torch.tensor([0, 2, 1]).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    out = fuse_raters(masks, num_classes=3, method="label_smoothing", smoothing=0.3,
                      generator=torch.Generator().manual_seed(0))
    close(out[0, :, 0], [[0.8, 0.1, 0.1], [0.1, 0.1, 0.8], [0.1, 0.8, 0.1]])


def test_label_smoothing_smooths_one_random_rater_reproducibly() -> None:
    """eps = 0.2, K = 2: each draw is 0.8 * one_hot(r) + 0.1 for one rater r; seeded -> reproducible."""
    for seed in range(10):
        out = fuse_raters(BINARY, method="label_smoothing", smoothing=0.2, generator=torch.Generator().manual_seed(seed))
        again = fuse_raters(BINARY, method="label_smoothing", smoothing=0.2, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(out, again)
        candidates = [0.8 * binary_map(BINARY[0, r, 0].tolist()) + 0.1 for r in range(4)]
        assert sum(bool(torch.allclose(out, c)) for c in candidates) == 1


# --- invariants -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", FUSIONS)
def test_output_shape_dtype_and_sums_to_one(method: str) -> None:
    g = torch.Generator().manual_seed(1)
    masks = torch.randint(3, (2, 4, 2, 3), generator=g)
    rater_mask = torch.tensor([[True, False, True, True], [False, False, True, False]])
    for rm in (None, rater_mask):
        out = fuse_raters(masks, rm, num_classes=3, method=method, generator=g)
        assert out.shape == (2, 3, 2, 3)
        assert out.dtype == torch.float32
        assert bool((out >= 0).all())
        close(out.sum(1), torch.ones(2, 2, 3))


# --- errors ---------------------------------------------------------------------------------------


def test_unknown_method_raises() -> None:
    with pytest.raises(ValueError, match="unknown fusion 'median'"):
        fuse_raters(BINARY, method="median")


@pytest.mark.parametrize("smoothing", [1.0, -0.1, 1.5])
def test_bad_smoothing_raises(smoothing: float) -> None:
    with pytest.raises(ValueError, match="smoothing must be in"):
        fuse_raters(BINARY, method="label_smoothing", smoothing=smoothing)


@pytest.mark.parametrize("method", FUSIONS)
def test_wrong_rank_raises(method: str) -> None:
    with pytest.raises(ValueError, match=r"\(B, R, H, W\)"):
        fuse_raters(BINARY[0], method=method)


@pytest.mark.parametrize("method", FUSIONS)
def test_all_false_rater_mask_row_raises(method: str) -> None:
    masks = torch.cat([BINARY, BINARY])
    rater_mask = torch.tensor([[True, False, False, False], [False, False, False, False]])
    with pytest.raises(ValueError, match="at least one rater"):
        fuse_raters(masks, rater_mask, method=method)


@pytest.mark.parametrize("method", FUSIONS)
def test_rater_mask_of_wrong_shape_raises(method: str) -> None:
    with pytest.raises(ValueError, match="rater_mask must have shape"):
        fuse_raters(BINARY, torch.ones(1, 3, dtype=torch.bool), method=method)

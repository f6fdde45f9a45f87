"""ECE, reliability bins, majority vote and BDice against numpy loops (bins by exact rational
comparison, rater means as exact fractions) and hand-built examples."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from probseg.data.fusion import majority_vote
from probseg.metrics.functional import binarized_dice, calibration_bins, dice_score, expected_calibration_error
from tests.metrics._reference import mixed_masks, ref_bdice, ref_bin, ref_dice, ref_ece, ref_majority_vote


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _binary_data(seed: int, b: int = 3, s: int = 4, r: int = 5, h: int = 12, w: int = 15):
    """Foreground probabilities loosely following the raters, plus integer rater masks."""
    rng = np.random.default_rng(seed)
    target = mixed_masks(rng, (b, r, h, w)).astype(np.int64)
    consensus = target.mean(axis=1, keepdims=True)
    pred = np.clip(0.6 * consensus + 0.4 * rng.random((b, s, h, w)), 0, 1)
    return pred, target


def _multi_data(seed: int, k: int, b: int = 3, s: int = 3, r: int = 4, h: int = 10, w: int = 13):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, k, (b, r, h, w))
    target[:, :, : h // 2] = target[:, :1, : h // 2]  # agreement in the top half
    probs = _softmax(rng.normal(size=(b, s, k, h, w)) * 2, axis=2)
    return probs, target


def _present(seed: int, b: int, r: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = rng.random((b, r)) < 0.6
    mask[np.arange(b), rng.integers(0, r, b)] = True
    return mask


# ----------------------------------------------------------------------------- majority vote


def test_majority_vote_ties_and_rater_mask_by_hand() -> None:
    """Binary 2-2 -> 0; 3 classes with counts (1, 2, 2) -> 1; an absent rater does not vote."""
    masks = torch.tensor([[0, 0, 1, 1], [2, 1, 1, 2], [0, 1, 1, 1]]).T.reshape(1, 4, 1, 3)  # (1, R=4, 1, 3)
    # pixel votes: (0, 0, 1, 1) -> 0; (2, 1, 1, 2) -> 1; (0, 1, 1, 1) -> 1
    assert majority_vote(masks).tolist() == [[[0, 1, 1]]]
    # raters 0 and 3 only: (0, 1) -> 0; (2, 2) -> 2; (0, 1) -> 0
    assert majority_vote(masks, torch.tensor([[True, False, False, True]])).tolist() == [[[0, 2, 0]]]
    # rater 0 absent: (0, 1, 1) -> 1; (1, 1, 2) -> 1; (1, 1, 1) -> 1
    assert majority_vote(masks, torch.tensor([[False, True, True, True]])).tolist() == [[[1, 1, 1]]]


@pytest.mark.parametrize("k", [2, 3, 5])
def test_majority_vote_matches_counting_loop(k: int) -> None:
    """Per-pixel python counting over present raters, first maximum wins."""
    rng = np.random.default_rng(k)
    masks = rng.integers(0, k, (3, 4, 7, 9))
    present = _present(k, 3, 4)
    got = majority_vote(torch.as_tensor(masks), torch.as_tensor(present), num_classes=k)
    assert got.dtype == torch.int64
    for i in range(3):
        np.testing.assert_array_equal(got[i].numpy(), ref_majority_vote(masks[i], present[i], k))
    got_all = majority_vote(torch.as_tensor(masks))  # num_classes from the data, every rater
    for i in range(3):
        np.testing.assert_array_equal(got_all[i].numpy(), ref_majority_vote(masks[i], None, int(masks.max()) + 1))


def test_majority_vote_bool_masks() -> None:
    masks = torch.tensor([True, True, False]).view(1, 3, 1, 1)
    assert majority_vote(masks).item() == 1


# ----------------------------------------------------------------------------- reliability bins


def test_calibration_bins_by_hand() -> None:
    """M = 4: 0 -> bin 0, 0.25 -> bin 1 (left-closed), 0.5 -> 2, 0.75 -> 3, 1 -> 3 (last bin holds 1)."""
    conf = torch.tensor([[0.0, 0.25, 0.5, 0.75, 1.0, 0.1, 0.6]])
    correct = torch.tensor([[1, 0, 1, 1, 0, 1, 1]], dtype=torch.bool)
    got = calibration_bins(conf, correct, num_bins=4)
    assert got.shape == (1, 4, 3)
    expect = [[2, 0.1, 2], [1, 0.25, 0], [2, 1.1, 2], [2, 1.75, 1]]
    np.testing.assert_allclose(got[0].numpy(), expect, atol=1e-7)


@pytest.mark.parametrize("num_bins", [1, 7, 15])
def test_calibration_bins_match_loop(num_bins: int) -> None:
    """Counts, summed confidence and correctness per bin with exact rational bin membership."""
    rng = np.random.default_rng(num_bins)
    conf = rng.random((3, 200))
    conf[0, :5] = [0.0, 1.0, 0.5, 1.0, 0.0]
    correct = rng.random((3, 200)) < conf
    got = calibration_bins(torch.as_tensor(conf), torch.as_tensor(correct), num_bins).numpy()
    expect = np.zeros((3, num_bins, 3))
    for i in range(3):
        for c, ok in zip(conf[i], correct[i]):
            m = ref_bin(c, num_bins)
            expect[i, m] += [1, c, ok]
    np.testing.assert_allclose(got, expect, atol=1e-10)
    assert (got[..., 0].sum(axis=1) == 200).all()


def test_calibration_bins_rejects_no_bins() -> None:
    with pytest.raises(ValueError, match="num_bins"):
        calibration_bins(torch.rand(1, 3), torch.ones(1, 3), 0)


# ----------------------------------------------------------------------------- ECE


@pytest.mark.parametrize("num_bins", [15, 4, 1])
@pytest.mark.parametrize("with_mask", [False, True])
def test_ece_binary_matches_loop(num_bins: int, with_mask: bool) -> None:
    """(B, S, H, W) foreground probabilities: mean over S of (1 - p, p), loop over bins."""
    pred, target = _binary_data(num_bins + 10 * with_mask)
    present = _present(1, 3, 5) if with_mask else None
    got = expected_calibration_error(
        torch.as_tensor(pred), torch.as_tensor(target), None if present is None else torch.as_tensor(present), num_bins
    )
    assert got.shape == (3,)
    for i in range(3):
        assert got[i].item() == pytest.approx(ref_ece(pred[i], target[i], None if present is None else present[i], num_bins), abs=1e-10)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_ece_multiclass_matches_loop(k: int) -> None:
    """(B, S, K, H, W) class probabilities with a rater mask."""
    probs, target = _multi_data(k, k)
    present = _present(k + 1, 3, 4)
    got = expected_calibration_error(torch.as_tensor(probs), torch.as_tensor(target), torch.as_tensor(present))
    for i in range(3):
        assert got[i].item() == pytest.approx(ref_ece(probs[i], target[i], present[i]), abs=1e-10)


def test_ece_rater_mask_equals_subset_call() -> None:
    pred, target = _binary_data(77)
    present = _present(5, 3, 5)
    got = expected_calibration_error(torch.as_tensor(pred), torch.as_tensor(target), torch.as_tensor(present))
    for i in range(3):
        alone = expected_calibration_error(torch.as_tensor(pred[i : i + 1]), torch.as_tensor(target[i : i + 1, present[i]]))
        assert got[i].item() == pytest.approx(alone.item(), abs=1e-12)


def test_ece_perfect_calibration_is_zero() -> None:
    """20 pixels, S = 1, one rater. p = 0.75 on 4 pixels (label 1, conf 0.75, 3 correct);
    p = 0.1 on 10 pixels (label 0, conf 0.9, 9 correct); p = 0.5 on 6 pixels (tie -> label 0,
    conf 0.5, 3 correct). Each bin's accuracy equals its confidence -> ECE 0."""
    p = np.array([0.75] * 4 + [0.1] * 10 + [0.5] * 6)
    t = np.array([1, 1, 1, 0] + [0] * 9 + [1] + [0, 0, 0, 1, 1, 1])
    got = expected_calibration_error(torch.as_tensor(p.reshape(1, 1, 4, 5)), torch.as_tensor(t.reshape(1, 1, 4, 5)))
    assert got.item() == pytest.approx(0.0, abs=1e-12)
    # 4 of 4 correct in the p = 0.75 bin: ECE = 4/20 * |1 - 0.75| = 0.05
    t2 = t.copy()
    t2[3] = 1
    got2 = expected_calibration_error(torch.as_tensor(p.reshape(1, 1, 4, 5)), torch.as_tensor(t2.reshape(1, 1, 4, 5)))
    assert got2.item() == pytest.approx(0.05, abs=1e-12)


def test_ece_by_hand_overconfident() -> None:
    """All pixels p = 0.9 (two samples 0.8 and 1.0), raters' vote foreground on half: |0.5 - 0.9| = 0.4."""
    pred = torch.tensor([0.8, 1.0], dtype=torch.float64).view(1, 2, 1, 1).expand(1, 2, 4, 4).clone()
    target = torch.zeros(1, 3, 4, 4, dtype=torch.long)
    target[:, :2, :2] = 1  # 2 of 3 raters -> foreground in the top half
    target[:, 2, 2:] = 1  # 1 of 3 -> background in the bottom half
    assert expected_calibration_error(pred, target).item() == pytest.approx(0.4, abs=1e-12)


def test_ece_argmax_ties_go_to_the_lower_class() -> None:
    """Mean class probabilities (0.4, 0.4, 0.2) everywhere, raters vote class 0: label must be 0
    (accuracy 1, ECE = 1 - 0.4 = 0.6; label 1 would give 0.4)."""
    probs = torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64).view(1, 1, 3, 1, 1).expand(1, 2, 3, 3, 3).clone()
    target = torch.zeros(1, 2, 3, 3, dtype=torch.long)
    target[:, 1] = 2  # 1-1 tie between classes 0 and 2 -> vote 0
    assert expected_calibration_error(probs, target).item() == pytest.approx(0.6, abs=1e-12)


def test_ece_float32_input() -> None:
    """float32 probabilities: the loop on the same float32 values (up to float32 rounding)."""
    pred, target = _binary_data(3)
    out = expected_calibration_error(torch.as_tensor(pred).float(), torch.as_tensor(target))
    assert np.allclose(out.numpy(), [ref_ece(pred[i].astype(np.float32), target[i]) for i in range(3)], atol=1e-5)


@pytest.mark.parametrize("fn", [expected_calibration_error, binarized_dice])
def test_calibration_errors(fn) -> None:
    p = torch.full((1, 2, 4, 4), 0.5)
    t = torch.zeros(1, 3, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="pred must be"):
        fn(torch.full((2, 4, 4), 0.5), t)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fn(p + 1, t)
    with pytest.raises(ValueError, match="NaN"):
        fn(torch.full((1, 2, 4, 4), float("nan")), t)
    with pytest.raises(TypeError, match="integer class ids"):
        fn(p, t.float())
    with pytest.raises(ValueError, match="class ids outside"):
        fn(p, t + 2)
    with pytest.raises(ValueError, match="class ids outside"):
        fn(torch.full((1, 2, 3, 4, 4), 1 / 3), t + 3)
    with pytest.raises(ValueError, match="must share"):
        fn(p, torch.zeros(1, 3, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="must share"):
        fn(p, torch.zeros(2, 3, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one rater"):
        fn(p, t, torch.tensor([[False, False, False]]))
    with pytest.raises(ValueError, match="rater_mask"):
        fn(p, t, torch.tensor([[True, False]]))


# ----------------------------------------------------------------------------- BDice

BDICE_ATOL = 1e-6  # float32 predictions give float32 results


def test_bdice_float64_result_has_float64_precision() -> None:
    """Thresholds (0.5,), prediction {0, 2} vs raters {0}: Dice = 2/3 to double precision."""
    pred = torch.tensor([0.7, 0.3, 0.9, 0.1], dtype=torch.float64).view(1, 1, 1, 4)
    target = torch.tensor([1, 0, 0, 0]).view(1, 1, 1, 4)
    out = binarized_dice(pred, target, thresholds=(0.5,))
    assert out.item() == pytest.approx(2 / 3, abs=1e-12)


def test_bdice_rater_mean_is_compared_exactly() -> None:
    """1 x 11 image, 10 raters, pixel j has exactly j foreground votes; mean prediction
    min(j/10 + 0.05, 1).
    At level k/10: prediction foreground {j >= k} (11 - k pixels), raters {j > k} (10 - k pixels;
    j = k is NOT above k/10), overlap 10 - k -> Dice 2(10 - k)/(21 - 2k); BDice = their mean."""
    votes = np.arange(11)
    target = np.zeros((1, 10, 1, 11), dtype=np.int64)
    for j in votes:
        target[0, :j, 0, j] = 1
    pred = torch.as_tensor(np.minimum(votes / 10 + 0.05, 1.0).reshape(1, 1, 1, 11))
    expect = np.mean([2 * (10 - k) / (21 - 2 * k) for k in range(1, 10)])
    assert binarized_dice(pred, torch.as_tensor(target)).item() == pytest.approx(expect, abs=BDICE_ATOL)
    # float32 predictions: same (the rater side is what must be exact)
    assert binarized_dice(pred.float(), torch.as_tensor(target)).item() == pytest.approx(expect, abs=1e-6)
    # 12 raters of which 2 absent (they vote foreground everywhere): the same 10 present raters decide
    target12 = np.concatenate([target, np.ones((1, 2, 1, 11), np.int64)], axis=1)
    present = torch.tensor([[True] * 10 + [False] * 2])
    assert binarized_dice(pred, torch.as_tensor(target12), present).item() == pytest.approx(expect, abs=BDICE_ATOL)


def test_bdice_empty_conventions() -> None:
    """Both empty at every level -> 1; prediction empty but raters unanimous -> 0."""
    pred = torch.zeros(2, 3, 5, 5, dtype=torch.float64)
    target = torch.zeros(2, 2, 5, 5, dtype=torch.long)
    target[1] = 1
    assert binarized_dice(pred, target).tolist() == pytest.approx([1.0, 0.0])


def test_bdice_custom_thresholds_by_hand() -> None:
    """Thresholds (0.5,): mean prediction {0.7, 0.3, 0.9, 0.1}, raters' mean {1, 1/2, 0, 1/2}
    -> prediction {0, 2}, raters {0} -> Dice 2/3."""
    pred = torch.tensor([[0.6, 0.4, 0.8, 0.0], [0.8, 0.2, 1.0, 0.2]], dtype=torch.float64).view(1, 2, 1, 4)
    target = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 1]]).view(1, 2, 1, 4)
    assert binarized_dice(pred, target, thresholds=(0.5,)).item() == pytest.approx(2 / 3, abs=BDICE_ATOL)


@pytest.mark.parametrize("with_mask", [False, True])
def test_bdice_binary_matches_loop(with_mask: bool) -> None:
    pred, target = _binary_data(5 + with_mask, r=10)
    present = _present(2, 3, 10) if with_mask else None
    got = binarized_dice(torch.as_tensor(pred), torch.as_tensor(target), None if present is None else torch.as_tensor(present))
    assert got.shape == (3,)
    for i in range(3):
        assert got[i].item() == pytest.approx(ref_bdice(pred[i], target[i], None if present is None else present[i]), abs=BDICE_ATOL)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_bdice_multiclass_is_mean_over_foreground_classes(k: int) -> None:
    probs, target = _multi_data(20 + k, k)
    present = _present(k, 3, 4)
    got = binarized_dice(torch.as_tensor(probs), torch.as_tensor(target), torch.as_tensor(present))
    for i in range(3):
        assert got[i].item() == pytest.approx(ref_bdice(probs[i], target[i], present[i]), abs=BDICE_ATOL)


def test_bdice_rejects_bad_thresholds() -> None:
    p = torch.full((1, 1, 2, 2), 0.5)
    t = torch.zeros(1, 1, 2, 2, dtype=torch.long)
    for th in ((), (0.0, 0.5), (0.5, 1.0)):
        with pytest.raises(ValueError, match="thresholds"):
            binarized_dice(p, t, thresholds=th)


def test_fraction_sanity() -> None:
    """The pitfall the exact comparison avoids: 3 of 10 raters, mean in float32, is above 0.3."""
    assert not Fraction(3, 10) > Fraction("0.3")
    assert float(np.float32(3) / np.float32(10)) > 0.3


@pytest.mark.parametrize("with_mask", [False, True])
def test_dice_binary_matches_loop(with_mask: bool) -> None:
    pred, target = _binary_data(7 + with_mask, r=10)
    present = _present(2, 3, 10) if with_mask else None
    got = dice_score(torch.as_tensor(pred), torch.as_tensor(target), None if present is None else torch.as_tensor(present))
    assert got.shape == (3,)
    for i in range(3):
        assert got[i].item() == pytest.approx(ref_dice(pred[i], target[i], None if present is None else present[i]), abs=1e-6)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_dice_multiclass_is_mean_over_foreground_classes(k: int) -> None:
    probs, target = _multi_data(30 + k, k)
    present = _present(k, 3, 4)
    got = dice_score(torch.as_tensor(probs), torch.as_tensor(target), torch.as_tensor(present))
    for i in range(3):
        assert got[i].item() == pytest.approx(ref_dice(probs[i], target[i], present[i]), abs=1e-6)


def test_dice_by_hand_and_empty_conventions() -> None:
    """Mean prediction {0.8, 0.6, 0.2, 0.4} -> foreground {0, 1}; raters' vote {0, 2} -> 2/4."""
    pred = torch.tensor([[0.8, 0.6, 0.2, 0.4]], dtype=torch.float64).view(1, 1, 1, 4)
    target = torch.tensor([[1, 0, 1, 0]]).view(1, 1, 1, 4)
    assert dice_score(pred, target).item() == pytest.approx(0.5)
    empty = torch.zeros(2, 1, 3, 3, dtype=torch.float64)
    raters = torch.zeros(2, 2, 3, 3, dtype=torch.long)
    raters[1] = 1
    assert dice_score(empty, raters).tolist() == [1.0, 0.0]

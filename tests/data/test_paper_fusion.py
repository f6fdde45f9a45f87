"""Rater fusion with ``recipe="paper"`` (Wang et al.'s reference code) against python loops
written from the paper's description: the Dice-weighted mean with the reference's guards (a Dice
<= 0 or an empty union weighs 1) and label smoothing of the hard label on boundary pixels only
(another class in the 3x3 window)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probseg.data.fusion import FUSION_RECIPES, fuse_raters, fusion_options, rater_weights, training_target


def ref_weighted_mean(raters: np.ndarray) -> np.ndarray:
    """(R, H, W) binary rater masks -> the foreground map of the reference's weighted mean: the
    strict majority (votes >= R // 2 + 1), each rater's Dice (|a + m| - |a - m|) / |a + m| against
    it (1 when the union is empty or the Dice is <= 0), the raters averaged with those weights."""
    r = raters.shape[0]
    majority = (raters.sum(0) >= r // 2 + 1).astype(float)
    weights = []
    for a in raters.astype(float):
        union, diff = float((a + majority).sum()), float(np.abs(a - majority).sum())
        dice = 1.0 if union <= 0 else (union - diff) / union
        weights.append(1.0 if dice <= 0 else dice)
    return sum(w * a for w, a in zip(weights, raters.astype(float), strict=True)) / sum(weights)


def ref_boundary_smoothing(label: np.ndarray, k: int, eps: float) -> np.ndarray:
    """(H, W) class ids -> (K, H, W): one-hot, and (1 - eps) y + eps / K where the 3x3 window
    (clipped at the border) holds another class."""
    h, w = label.shape
    out = np.zeros((k, h, w))
    for i in range(h):
        for j in range(w):
            out[label[i, j], i, j] = 1.0
            window = label[max(i - 1, 0):i + 2, max(j - 1, 0):j + 2]
            if (window != label[i, j]).any():
                out[:, i, j] = (1 - eps) * out[:, i, j] + eps / k
    return out


def ref_majority(raters: np.ndarray, k: int) -> np.ndarray:
    """(R, H, W) -> (H, W): the most frequent class at each pixel, ties to the lowest id."""
    counts = np.stack([(raters == c).sum(0) for c in range(k)])
    return counts.argmax(0)


def _paper(masks: torch.Tensor, method: str, **kw) -> torch.Tensor:
    return fuse_raters(masks, None, kw.pop("num_classes", 2), method, recipe="paper", **kw)


def test_disjoint_rater_weighs_one_as_in_the_reference() -> None:
    """Raters r0 = r1 = [1, 1, 0, 0] (the majority) and r2 = [0, 0, 1, 1], disjoint from it:
    reference weights 1, 1, 1 -> [2/3, 2/3, 1/3, 1/3]; probseg's weights 1, 1, 0 -> [1, 1, 0, 0]."""
    masks = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1]]).view(1, 3, 1, 4)
    want = ref_weighted_mean(masks[0].numpy())
    np.testing.assert_allclose(want.ravel(), [2 / 3, 2 / 3, 1 / 3, 1 / 3])
    np.testing.assert_allclose(_paper(masks, "weighted_mean")[0, 1].numpy(), want, rtol=1e-6)
    np.testing.assert_allclose(fuse_raters(masks, None, 2, "weighted_mean")[0, 1].numpy().ravel(), [1, 1, 0, 0])
    torch.testing.assert_close(rater_weights(masks, None, 2, zero_dice="one"), torch.full((1, 3), 1 / 3))


def test_empty_majority_gives_the_uniform_mean() -> None:
    """r0 = [1, 0, 0], r1 = [0, 1, 0], r2 empty: the majority is empty; the reference weighs every
    rater 1 (Dice 0 -> 1, empty union -> 1): [1/3, 1/3, 0]. probseg's weights give r2 all of it
    (an all-background target)."""
    masks = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 0]]).view(1, 3, 1, 3)
    want = ref_weighted_mean(masks[0].numpy())
    np.testing.assert_allclose(want.ravel(), [1 / 3, 1 / 3, 0])
    np.testing.assert_allclose(_paper(masks, "weighted_mean")[0, 1].numpy(), want, rtol=1e-6)
    np.testing.assert_allclose(fuse_raters(masks, None, 2, "weighted_mean")[0, 1].numpy().ravel(), [0, 0, 0])


@pytest.mark.parametrize("seed", range(4))
def test_weighted_mean_matches_the_reference_on_random_rater_sets(seed: int) -> None:
    """100 random binary rater sets (2-5 raters, sparse and dense masks, so disjoint raters and
    empty majorities occur): the paper recipe equals the reference loop in every one."""
    rng = np.random.default_rng(seed)
    for _ in range(100):
        r = int(rng.integers(2, 6))
        raters = (rng.random((r, 3, 4)) < rng.choice([0.05, 0.2, 0.5])).astype(np.int64)
        got = _paper(torch.from_numpy(raters)[None], "weighted_mean")[0]
        np.testing.assert_allclose(got[1].numpy(), ref_weighted_mean(raters), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(got.sum(0).numpy(), 1.0, rtol=1e-6)


@pytest.mark.parametrize(("k", "eps"), [(2, 0.5), (3, 0.5), (4, 0.2)])
def test_boundary_label_smoothing_of_the_majority_vote(k: int, eps: float) -> None:
    """Blocky random labels from 3 raters: the paper recipe smooths the majority vote on the
    pixels whose 3x3 window holds another class and leaves the others one-hot."""
    g = torch.Generator().manual_seed(k)
    coarse = torch.randint(0, k, (2, 3, 3, 4), generator=g)
    masks = coarse.repeat_interleave(3, dim=2).repeat_interleave(2, dim=3)  # (2, 3, 9, 8) blocks
    masks[:, 1, ::4, ::3] = torch.randint(0, k, masks[:, 1, ::4, ::3].shape, generator=g)  # some noise
    got = _paper(masks, "label_smoothing", num_classes=k, smoothing=eps)
    for b in range(2):
        vote = ref_majority(masks[b].numpy(), k)
        want = ref_boundary_smoothing(vote, k, eps)
        np.testing.assert_allclose(got[b].numpy(), want, rtol=1e-6, atol=1e-7)
        interior = (want.max(0) == 1.0).mean()
        assert 0 < interior < 1  # both kinds of pixel occur
    # deterministic: no rater is drawn, the generator is not used
    torch.testing.assert_close(got, _paper(masks, "label_smoothing", num_classes=k, smoothing=eps,
                                           generator=torch.Generator().manual_seed(99)))


def test_each_label_smoothing_option_alone() -> None:
    """smoothing_region="boundary" on one random rater, and smoothing_label="majority" everywhere."""
    masks = torch.tensor([[[0, 0, 1, 1]], [[0, 1, 1, 1]], [[0, 0, 0, 1]]]).view(1, 3, 1, 4)
    eps = 0.5
    g = torch.Generator().manual_seed(0)
    rater = int(torch.randint(3, (1,), generator=torch.Generator().manual_seed(0)))
    got = fuse_raters(masks, None, 2, "label_smoothing", eps, g, smoothing_region="boundary")
    np.testing.assert_allclose(got[0].numpy(), ref_boundary_smoothing(masks[0, rater].numpy(), 2, eps), rtol=1e-6)
    vote = ref_majority(masks[0].numpy(), 2)  # [0, 0, 1, 1]
    everywhere = fuse_raters(masks, None, 2, "label_smoothing", eps, smoothing_label="majority")
    np.testing.assert_allclose(everywhere[0, 1, 0].numpy(), np.where(vote[0] == 1, 0.75, 0.25), rtol=1e-6)


def test_recipes_and_option_checks() -> None:
    assert fusion_options() == FUSION_RECIPES["probseg"]
    assert fusion_options("paper") == {"zero_dice": "one", "smoothing_label": "majority",
                                       "smoothing_region": "boundary", "boundary_width": 1}
    assert fusion_options("paper", zero_dice="zero", boundary_width=2)["zero_dice"] == "zero"
    for bad, message in (({"recipe": "wang"}, "recipe must be one of"), ({"zero_dice": "half"}, "zero_dice must be"),
                         ({"smoothing_region": "edge"}, "smoothing_region must be"),
                         ({"boundary_width": 0}, "boundary_width must be"), ({"width": 1}, "unknown fusion options")):
        with pytest.raises(ValueError, match=message):
            fusion_options(**bad)
    masks = torch.zeros(1, 2, 3, 3, dtype=torch.long)
    # hard fusions return class ids whatever the options
    assert training_target(masks, None, 2, "majority", recipe="paper").shape == (1, 3, 3)

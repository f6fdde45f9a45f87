"""``random_rater``: only available raters, uniformly, reproducibly."""

from __future__ import annotations

import math

import pytest
import torch

from probseg.data import random_rater


def _labelled_masks(b: int, r: int, h: int = 2, w: int = 3) -> torch.Tensor:
    """(B, R, H, W) where rater r's mask is filled with r + 10 * b: the output names the choice."""
    rater = torch.arange(r).view(1, r, 1, 1)
    image = torch.arange(b).view(b, 1, 1, 1)
    return (rater + 10 * image).expand(b, r, h, w).clone()


def _chosen(out: torch.Tensor, b: int) -> torch.Tensor:
    """Recover the chosen rater per image, checking the mask is one of that image's masks."""
    assert out.shape[0] == b
    first = out[:, 0, 0]
    assert (out == first.view(b, 1, 1)).all(), "the output is not one whole rater mask"
    assert ((first // 10) == torch.arange(b)).all(), "image b got a mask of another image"
    return first % 10


def test_random_rater_returns_one_whole_mask_of_the_same_image() -> None:
    masks = _labelled_masks(5, 4)
    out = random_rater(masks, generator=torch.Generator().manual_seed(0))
    assert out.shape == (5, 2, 3)
    assert out.dtype == masks.dtype
    _chosen(out, 5)


@pytest.mark.parametrize(
    "row",
    [[True, True, True, True], [True, False, True, False], [False, False, False, True], [False, True, True, True]],
)
def test_random_rater_picks_available_raters_uniformly(row: list[bool]) -> None:
    n = 20_000
    r = len(row)
    masks = _labelled_masks(1, r, 1, 1).expand(n, r, 1, 1)  # n copies of one image
    rater_mask = torch.tensor(row).expand(n, r)
    out = random_rater(masks, rater_mask, generator=torch.Generator().manual_seed(1))[:, 0, 0]
    counts = torch.bincount(out, minlength=r).double()
    available = torch.tensor(row)
    assert counts[~available].sum() == 0, "picked a rater whose rater_mask is False"
    p = 1 / int(available.sum())
    tol = 4 * math.sqrt(n * p * (1 - p)) + 1
    assert ((counts[available] - n * p).abs() <= tol).all(), counts


def test_random_rater_without_rater_mask_is_uniform_over_all_raters() -> None:
    n, r = 20_000, 3
    masks = _labelled_masks(1, r, 1, 1).expand(n, r, 1, 1)
    out = random_rater(masks, generator=torch.Generator().manual_seed(2))[:, 0, 0]
    counts = torch.bincount(out, minlength=r).double()
    p = 1 / r
    assert ((counts - n * p).abs() <= 4 * math.sqrt(n * p * (1 - p))).all(), counts


def test_random_rater_mixed_rows_respect_their_own_mask() -> None:
    b, r = 64, 4
    masks = _labelled_masks(b, r)
    torch.manual_seed(0)
    rater_mask = torch.rand(b, r) < 0.5
    rater_mask[torch.arange(b), torch.randint(r, (b,))] = True  # at least one per row
    for seed in range(20):
        chosen = _chosen(random_rater(masks, rater_mask, generator=torch.Generator().manual_seed(seed)), b)
        assert rater_mask[torch.arange(b), chosen].all()


def test_random_rater_is_reproducible_with_a_generator() -> None:
    masks = _labelled_masks(32, 4)
    rater_mask = torch.ones(32, 4, dtype=torch.bool)
    rater_mask[:, 0] = False
    for rm in (None, rater_mask):
        a = random_rater(masks, rm, generator=torch.Generator().manual_seed(7))
        b = random_rater(masks, rm, generator=torch.Generator().manual_seed(7))
        c = random_rater(masks, rm, generator=torch.Generator().manual_seed(8))
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.equal(a, c)


def test_random_rater_is_reproducible_under_the_global_seed() -> None:
    masks = _labelled_masks(32, 4)
    torch.manual_seed(3)
    a = random_rater(masks, torch.ones(32, 4, dtype=torch.bool))
    torch.manual_seed(3)
    b = random_rater(masks, torch.ones(32, 4, dtype=torch.bool))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_random_rater_row_without_rater_is_an_error() -> None:
    rater_mask = torch.tensor([[True, False], [False, False]])
    with pytest.raises(ValueError, match="at least one rater"):
        random_rater(_labelled_masks(2, 2), rater_mask)


@pytest.mark.parametrize("shape", [(2, 3), (3, 2), (2,), (2, 2, 1)])
def test_random_rater_mask_shape_mismatch_is_an_error(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="rater_mask"):
        random_rater(_labelled_masks(2, 2), torch.ones(shape, dtype=torch.bool))


@pytest.mark.parametrize("shape", [(2, 4, 4), (2, 2, 4, 4, 1)])
def test_random_rater_masks_must_be_4d(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"\(B, R, H, W\)"):
        random_rater(torch.zeros(shape, dtype=torch.long))

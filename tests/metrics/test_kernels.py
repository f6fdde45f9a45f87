"""``pairwise_cost``, ``per_class_pairwise_cost`` and ``squared_distance_transform`` against
per-pair numpy brute force, scipy's ``directed_hausdorff`` and ``distance_transform_edt``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import distance_transform_edt

from probseg.metrics.functional import (
    foreground_windows,
    pairwise_cost,
    pairwise_costs,
    per_class_pairwise_cost,
    squared_distance_transform,
)
from probseg.metrics.functional import kernels as kernels_module
from tests.metrics._reference import mixed_masks, perturbed, ref_ce, ref_cost

ATOL = 1e-5


def _sets(seed: int, b: int, s: int, r: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Predictions partly perturbed copies of the raters (so overlaps are non-trivial)."""
    rng = np.random.default_rng(seed)
    target = mixed_masks(rng, (b, r, h, w))
    pred = mixed_masks(rng, (b, s, h, w))
    for i in range(b):
        for j in range(0, s, 2):
            pred[i, j] = perturbed(rng, target[i, j % r], 0.05)
    return pred, target


def _cost(pred: np.ndarray, target: np.ndarray, kernel: str, dtype=torch.bool, **kw) -> np.ndarray:
    out = pairwise_cost(torch.as_tensor(pred).to(dtype), torch.as_tensor(target).to(dtype), kernel, **kw)
    assert out.shape == (pred.shape[0], pred.shape[1], target.shape[1])
    assert out.dtype == torch.float32
    return out.double().numpy()


def _hausdorff_paths(pred: np.ndarray, target: np.ndarray) -> dict[str, np.ndarray]:
    """The public CPU path (scipy EDT per image box) and the batched torch brute-force path used on
    other devices (common window per batch + squared_distance_transform), forced on CPU."""
    p, t = torch.as_tensor(pred).bool(), torch.as_tensor(target).bool()
    torch_path = kernels_module._hausdorff_cost(p, t, foreground_windows(p, t), use_scipy=False)
    return {"public": _cost(pred, target, "hausdorff"), "torch": torch_path.double().numpy()}


# ----------------------------------------------------------------------------- overlap kernels


@pytest.mark.parametrize("kernel", ["iou", "dice", "hausdorff"])
@pytest.mark.parametrize("seed,h,w", [(0, 24, 24), (1, 20, 33), (2, 33, 20), (3, 16, 40)])
def test_binary_kernels_match_per_pair_brute_force(kernel: str, seed: int, h: int, w: int) -> None:
    """Random blob / pixel / empty masks vs numpy set counts and scipy directed_hausdorff."""
    pred, target = _sets(seed, b=3, s=4, r=3, h=h, w=w)
    np.testing.assert_allclose(_cost(pred, target, kernel), ref_cost(pred, target, kernel), rtol=1e-6, atol=ATOL)


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int64, torch.float32])
@pytest.mark.parametrize("kernel", ["iou", "dice", "hausdorff"])
def test_binary_kernels_accept_every_mask_dtype(kernel: str, dtype: torch.dtype) -> None:
    """bool, integer and 0/1 float masks give the brute-force costs."""
    pred, target = _sets(7, b=2, s=3, r=2, h=18, w=22)
    np.testing.assert_allclose(_cost(pred, target, kernel, dtype), ref_cost(pred, target, kernel), rtol=1e-6, atol=ATOL)


@pytest.mark.parametrize("h,w", [(20, 33), (33, 20), (17, 17)])
def test_empty_mask_conventions(h: int, w: int) -> None:
    """Both empty -> 0 for every kernel; exactly one empty -> 1 (iou, dice) and sqrt(H^2 + W^2)."""
    full = np.zeros((h, w), bool)
    full[3:6, 4:9] = True
    empty = np.zeros((h, w), bool)
    pred = np.stack([empty, full])[None]  # (1, 2, H, W)
    target = np.stack([empty, full])[None]
    diag = math.sqrt(h * h + w * w)
    expect = {"iou": [[0, 1], [1, 0]], "dice": [[0, 1], [1, 0]], "hausdorff": [[0, diag], [diag, 0]]}
    for kernel, e in expect.items():
        np.testing.assert_allclose(_cost(pred, target, kernel)[0], np.array(e, float), atol=ATOL)


def test_all_masks_empty_is_all_zero() -> None:
    """No foreground anywhere in the batch: every kernel gives exact zeros."""
    z = np.zeros((2, 3, 9, 11), bool)
    for kernel in ("iou", "dice", "hausdorff"):
        assert (_cost(z, z[:, :2], kernel) == 0).all()
    assert (_cost(z.astype(np.float32), z[:, :2], "ce", dtype=torch.float32) == 0).all()


def test_hausdorff_by_hand_on_border_and_single_pixel_masks() -> None:
    """Opposite corners of a 20x33 image: distance = the diagonal of the pixel grid, sqrt(19^2 + 32^2);
    single pixels (2, 3) vs (7, 15): 13; a pixel vs a border row: by hand."""
    h, w = 20, 33
    m = np.zeros((4, h, w), bool)
    m[0, 0, 0] = True
    m[1, h - 1, w - 1] = True
    m[2, 2, 3] = True
    m[3, 7, 15] = True
    border = np.zeros((h, w), bool)
    border[h - 1, :] = True  # bottom row
    got = _cost(m[None, :2], m[None, :2], "hausdorff")[0]
    np.testing.assert_allclose(got[0, 1], math.hypot(19, 32), atol=ATOL)
    np.testing.assert_allclose(_cost(m[None, 2:3], m[None, 3:4], "hausdorff")[0, 0, 0], 13.0, atol=ATOL)
    # pixel (0, 0) -> row 19 nearest point (19, 0): 19; row point (19, 32) -> (0, 0): hypot(19, 32)
    np.testing.assert_allclose(_cost(m[None, :1], border[None, None], "hausdorff")[0, 0, 0], math.hypot(19, 32), atol=ATOL)
    pred, target = m[None, [0, 1, 2]], np.stack([border, m[3]])[None]
    np.testing.assert_allclose(_cost(pred, target, "hausdorff"), ref_cost(pred, target, "hausdorff"), atol=ATOL)


def test_hausdorff_exact_with_far_apart_and_small_masks_in_one_batch() -> None:
    """The implementation crops one window per batch: image 0 has masks in opposite corners (window =
    whole image), image 1 small masks in the middle, image 2 single pixels near a border, image 3 is
    empty. Each must still match scipy."""
    h, w = 30, 37
    rng = np.random.default_rng(11)
    pred = np.zeros((4, 3, h, w), bool)
    target = np.zeros((4, 2, h, w), bool)
    pred[0, 0, :3, :4] = True
    pred[0, 1, -2:, -5:] = True
    pred[0, 2, 0, -1] = True
    target[0, 0, -1, 0] = True
    target[0, 1, 10:14, 15:20] = True
    pred[1, :, 14:16, 17:19] = rng.random((3, 2, 2)) < 0.7
    target[1, 0, 15, 18] = True
    target[1, 1, 13:17, 16:20] = rng.random((4, 4)) < 0.5
    pred[2, 0, 5, w - 1] = True
    pred[2, 1, 6, w - 3] = True
    target[2, 0, 25, w - 2] = True
    target[2, 1, 5:7, w - 3 :] = True
    expect = ref_cost(pred, target, "hausdorff")
    for path, got in _hausdorff_paths(pred, target).items():
        np.testing.assert_allclose(got, expect, rtol=1e-6, atol=ATOL, err_msg=path)
    # and the same images one at a time (no shared window)
    for i in range(4):
        np.testing.assert_allclose(
            _cost(pred[i : i + 1], target[i : i + 1], "hausdorff"),
            ref_cost(pred[i : i + 1], target[i : i + 1], "hausdorff"),
            rtol=1e-6,
            atol=ATOL,
        )


def test_hausdorff_random_sparse_pixels_non_square() -> None:
    """Very sparse random pixels (few points, large distances) on 33x20 and 20x33 images."""
    rng = np.random.default_rng(5)
    for h, w in ((33, 20), (20, 33)):
        pred = rng.random((3, 3, h, w)) < 0.01
        target = rng.random((3, 2, h, w)) < 0.01
        expect = ref_cost(pred, target, "hausdorff")
        for path, got in _hausdorff_paths(pred, target).items():
            np.testing.assert_allclose(got, expect, rtol=1e-6, atol=ATOL, err_msg=path)


@pytest.mark.parametrize("seed,h,w", [(20, 24, 24), (21, 20, 33), (22, 33, 20)])
def test_hausdorff_torch_path_matches_scipy(seed: int, h: int, w: int) -> None:
    """The device (non-scipy) Hausdorff path on random blob / pixel / empty masks vs scipy."""
    pred, target = _sets(seed, b=4, s=3, r=3, h=h, w=w)
    pred[3], target[3] = False, False  # an image without foreground next to the others
    expect = ref_cost(pred, target, "hausdorff")
    for path, got in _hausdorff_paths(pred, target).items():
        np.testing.assert_allclose(got, expect, rtol=1e-6, atol=ATOL, err_msg=path)


@pytest.mark.parametrize("h, w, layout", [(15, 21, "contiguous"), (16, 24, "contiguous"), (16, 24, "transposed"),
                                          (16, 24, "uint8")])
def test_foreground_windows_are_the_bounding_boxes(h: int, w: int, layout: str) -> None:
    """(row0, row1, col0, col1), end exclusive, of the union of every mask of both sets (np.argwhere);
    None without foreground. Sizes with H * W a multiple of 8 take the packed-word union; odd sizes,
    non-contiguous and integer masks the plain one."""
    pred, target = _sets(12, b=4, s=2, r=3, h=h, w=w)
    pred[2], target[2] = False, False
    pred[3], target[3] = False, False
    pred[3, 1, 4, 7] = True
    p, t = torch.as_tensor(pred), torch.as_tensor(target)
    if layout == "transposed":  # same masks, a non-contiguous (B, N, H, W) view
        p = p.transpose(2, 3).contiguous().transpose(2, 3)
        t = t.transpose(2, 3).contiguous().transpose(2, 3)
    elif layout == "uint8":
        p, t = p.to(torch.uint8), t.to(torch.uint8)
    got = foreground_windows(p, t)
    for i in range(4):
        pts = np.argwhere(np.concatenate([pred[i], target[i]]).any(axis=0))
        if len(pts) == 0:
            assert got[i] is None
        else:
            assert got[i] == (pts[:, 0].min(), pts[:, 0].max() + 1, pts[:, 1].min(), pts[:, 1].max() + 1)
    assert got[2] is None and got[3] == (4, 5, 7, 8)


def test_iou_and_dice_by_hand() -> None:
    """A = 4 pixels, B = 6 pixels, overlap 2: 1 - IoU = 1 - 2/8, 1 - Dice = 1 - 4/10."""
    a = np.zeros((1, 1, 4, 4), bool)
    b = np.zeros((1, 1, 4, 4), bool)
    a[0, 0, 0, :4] = True
    b[0, 0, 0, 2:4] = True
    b[0, 0, 1, :4] = True
    np.testing.assert_allclose(_cost(a, b, "iou")[0, 0, 0], 0.75, atol=1e-7)
    np.testing.assert_allclose(_cost(a, b, "dice")[0, 0, 0], 0.6, atol=1e-7)


# ----------------------------------------------------------------------------- cross-entropy


@pytest.mark.parametrize("eps", [1e-7, 1e-3])
def test_ce_matches_pixel_loop(eps: float) -> None:
    """Random probabilities (with exact 0s and 1s, so the clamp matters) vs a python pixel loop."""
    rng = np.random.default_rng(3)
    b, s, r, h, w = 2, 3, 3, 9, 13
    p = rng.random((b, s, h, w))
    p[rng.random(p.shape) < 0.2] = 0.0
    p[rng.random(p.shape) < 0.2] = 1.0
    p[0, 0] = 0.0  # exactly zero probabilities everywhere
    target = mixed_masks(rng, (b, r, h, w))
    target[0, 0] = False  # empty target against the all-zero prediction -> 0 by convention
    kw = {} if eps == 1e-7 else {"eps": eps}
    got = _cost(p, target, "ce", dtype=torch.float64, **kw)
    np.testing.assert_allclose(got, ref_cost(p, target, "ce", eps=eps), rtol=1e-5, atol=1e-6)
    assert got[0, 0, 0] == 0.0
    # The path GPUs take (one window and one batched product for the batch), run on CPU tensors.
    batched = kernels_module._cross_entropy_cost(torch.as_tensor(p), torch.as_tensor(target), eps, cpu_path=False)
    np.testing.assert_allclose(batched.double().numpy(), got, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("packed", [True, False])
def test_overlap_paths_match_per_pair_counts(packed: bool) -> None:
    """Both ways of counting intersections (popcount of packed bits, the CPU default; matrix
    products, the GPU path) against per-pair numpy counts."""
    if packed and not hasattr(np, "bitwise_count"):
        pytest.skip("numpy < 2 has no bitwise_count")
    pred, target = _sets(9, b=3, s=5, r=3, h=21, w=70)  # 21 x 70 = 1470 pixels: not a multiple of 64
    p, t = torch.as_tensor(pred), torch.as_tensor(target)
    got = kernels_module._overlap_costs(p, t, foreground_windows(p, t), ["iou", "dice"], packed=packed)
    for kernel in ("iou", "dice"):
        np.testing.assert_allclose(got[kernel].double().numpy(), ref_cost(pred, target, kernel), atol=1e-6)


def test_ce_empty_target_with_nonzero_probability_is_not_zero() -> None:
    """Only exactly-zero probabilities with an empty target give 0; one non-zero pixel does not (hand values)."""
    p = np.zeros((1, 2, 4, 4))
    p[0, 1, 0, 0] = 0.25
    t = np.zeros((1, 2, 4, 4), bool)
    t[0, 1, 2, 2] = True
    got = _cost(p, t, "ce", dtype=torch.float64)
    assert got[0, 0, 0] == 0.0
    # the 15 zero pixels are clamped to eps: each costs -log(1 - eps)
    np.testing.assert_allclose(got[0, 1, 0], (-math.log(0.75) + 15 * -math.log1p(-1e-7)) / 16, rtol=1e-6)
    np.testing.assert_allclose(got[0, 0, 1], -math.log(1e-7) / 16 + 15 * -math.log1p(-1e-7) / 16, rtol=1e-6)
    np.testing.assert_allclose(got, ref_cost(p, t, "ce"), rtol=1e-6)


# ----------------------------------------------------------------------------- distance transform


@pytest.mark.parametrize("h,w", [(17, 23), (23, 17), (1, 30), (30, 1), (12, 12)])
def test_squared_distance_transform_matches_scipy(h: int, w: int) -> None:
    """Exact integers equal to scipy's distance_transform_edt(~mask)**2; inf for all-False."""
    rng = np.random.default_rng(h * 100 + w)
    masks = mixed_masks(rng, (6, h, w), p_empty=0.0)
    masks[0] = False
    masks[1] = True
    masks[2] = False
    masks[2, 0, 0] = True  # one corner pixel
    got = squared_distance_transform(torch.as_tensor(masks))
    assert got.shape == (6, h, w) and got.dtype == torch.float32
    assert torch.isinf(got[0]).all()
    for i in range(1, 6):
        expect = distance_transform_edt(~masks[i]) ** 2 if masks[i].any() else np.full((h, w), np.inf)
        np.testing.assert_array_equal(got[i].double().numpy(), np.round(expect))


# ----------------------------------------------------------------------------- per class


@pytest.mark.parametrize("kernel", ["iou", "dice", "hausdorff"])
@pytest.mark.parametrize("k", [2, 4])
def test_per_class_cost_is_one_vs_rest_brute_force(kernel: str, k: int) -> None:
    """Loop over foreground classes c of the brute-force binary cost of (pred == c, target == c)."""
    rng = np.random.default_rng(k)
    b, s, r, h, w = 2, 3, 2, 14, 19
    target = rng.integers(0, k, (b, r, h, w))
    target[:, :, :, : w // 2] = 0  # large background area
    pred = target[:, rng.integers(0, r, s)].copy()
    pred[rng.random(pred.shape) < 0.1] = rng.integers(0, k)
    pred[1, 0] = 0  # a hypothesis without foreground
    expect = np.stack([ref_cost(pred == c, target == c, kernel) for c in range(1, k)], axis=1)  # (B, K-1, S, R)
    got = per_class_pairwise_cost(torch.as_tensor(pred), torch.as_tensor(target), k, kernel, average=False)
    assert got.shape == (b, k - 1, s, r)
    np.testing.assert_allclose(got.double().numpy(), expect, rtol=1e-6, atol=ATOL)
    avg = per_class_pairwise_cost(torch.as_tensor(pred), torch.as_tensor(target), k, kernel)
    np.testing.assert_allclose(avg.double().numpy(), expect.mean(axis=1), rtol=1e-6, atol=ATOL)


def test_per_class_ce_uses_class_probabilities() -> None:
    """(B, S, K, H, W) probabilities: cost of class c = pixel-loop CE of p[:, :, c] against target == c."""
    rng = np.random.default_rng(9)
    b, s, r, k, h, w = 2, 2, 3, 3, 6, 7
    logits = rng.normal(size=(b, s, k, h, w)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)
    target = rng.integers(0, k, (b, r, h, w))
    expect = np.zeros((b, k - 1, s, r))
    for i in range(b):
        for c in range(1, k):
            for j in range(s):
                for m in range(r):
                    expect[i, c - 1, j, m] = ref_ce(probs[i, j, c], target[i, m] == c)
    got = per_class_pairwise_cost(torch.as_tensor(probs), torch.as_tensor(target), k, "ce", average=False)
    np.testing.assert_allclose(got.double().numpy(), expect, rtol=1e-5)
    avg = per_class_pairwise_cost(torch.as_tensor(probs), torch.as_tensor(target), k, "ce")
    np.testing.assert_allclose(avg.double().numpy(), expect.mean(axis=1), rtol=1e-5)


# ----------------------------------------------------------------------------- several kernels at once


def test_pairwise_costs_returns_every_kernel() -> None:
    """One call with all kernels: each entry equals the brute force (binary masks for iou / dice /
    hausdorff, probabilities for ce), in the order asked."""
    pred, target = _sets(13, b=3, s=3, r=2, h=17, w=23)
    probs = np.clip(0.8 * pred + 0.2 * np.random.default_rng(0).random(pred.shape), 0, 1)
    order = ("hausdorff", "ce", "iou", "dice")
    got = pairwise_costs(torch.as_tensor(pred), torch.as_tensor(target), order, probs=torch.as_tensor(probs))
    assert tuple(got) == order
    for kernel in order:
        expect = ref_cost(probs if kernel == "ce" else pred, target, kernel)
        np.testing.assert_allclose(got[kernel].double().numpy(), expect, rtol=1e-5, atol=ATOL, err_msg=kernel)


def test_pairwise_costs_errors() -> None:
    m = _m(1, 2, 4, 4)
    with pytest.raises(ValueError, match="unknown kernels"):
        pairwise_costs(m, m, ("iou", "emd"))
    with pytest.raises(ValueError, match="probs"):
        pairwise_costs(m, m, ("iou", "ce"))
    with pytest.raises(ValueError, match="pred"):
        pairwise_costs(None, m, ("ce", "dice"), probs=torch.zeros(1, 2, 4, 4))


# ----------------------------------------------------------------------------- errors


def _m(*shape: int, dtype=torch.bool) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype)


@pytest.mark.parametrize(
    "pred,target,kernel,exc,match",
    [
        (_m(1, 2, 4, 4), _m(1, 2, 4, 4), "jaccard", ValueError, "unknown kernel"),
        (_m(2, 2, 4, 4), _m(1, 2, 4, 4), "iou", ValueError, "must share"),
        (_m(1, 2, 4, 4), _m(1, 2, 4, 5), "dice", ValueError, "must share"),
        (_m(1, 2, 5, 4), _m(1, 2, 4, 4), "hausdorff", ValueError, "must share"),
        (_m(2, 4, 4), _m(1, 2, 4, 4), "iou", ValueError, "shape"),
        (_m(1, 2, 4, 4), _m(1, 1, 2, 4, 4), "iou", ValueError, "shape"),
        (_m(1, 0, 4, 4), _m(1, 2, 4, 4), "iou", ValueError, "pred is empty"),
        (_m(0, 2, 4, 4), _m(0, 2, 4, 4), "ce", ValueError, "is empty"),
        (torch.full((1, 1, 3, 3), 2), _m(1, 1, 3, 3), "iou", ValueError, "binary"),
        (_m(1, 1, 3, 3), torch.full((1, 1, 3, 3), 2.0), "hausdorff", ValueError, "binary"),
        (torch.full((1, 1, 3, 3), 0.5), _m(1, 1, 3, 3), "dice", ValueError, "binary"),
        (torch.full((1, 1, 3, 3), float("nan")), _m(1, 1, 3, 3), "ce", ValueError, "NaN"),
        (torch.full((1, 1, 3, 3), float("inf")), _m(1, 1, 3, 3), "ce", ValueError, r"Inf|\[0, 1\]"),
        (torch.full((1, 1, 3, 3), 1.5), _m(1, 1, 3, 3), "ce", ValueError, r"\[0, 1\]"),
        (torch.full((1, 1, 3, 3), -0.1), _m(1, 1, 3, 3), "ce", ValueError, r"\[0, 1\]"),
        (torch.ones((1, 1, 3, 3), dtype=torch.long), _m(1, 1, 3, 3), "ce", TypeError, "floating"),
        (torch.full((1, 1, 3, 3), 0.5), torch.full((1, 1, 3, 3), 3), "ce", ValueError, "binary"),
        ([[[[0]]]], _m(1, 1, 1, 1), "iou", TypeError, "torch.Tensor"),
    ],
)
def test_pairwise_cost_errors(pred, target, kernel, exc, match) -> None:
    with pytest.raises(exc, match=match):
        pairwise_cost(pred, target, kernel)


def test_ce_eps_must_be_in_open_interval() -> None:
    p = torch.full((1, 1, 2, 2), 0.5)
    for eps in (0.0, 0.5, -1e-3):
        with pytest.raises(ValueError, match="eps"):
            pairwise_cost(p, _m(1, 1, 2, 2), "ce", eps=eps)


def test_per_class_and_distance_transform_errors() -> None:
    labels = torch.zeros(1, 2, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="num_classes"):
        per_class_pairwise_cost(labels, labels, 1)
    with pytest.raises(TypeError, match="integer class ids"):
        per_class_pairwise_cost(labels.float(), labels, 3, "iou")
    with pytest.raises(ValueError, match="3 class probabilities"):
        per_class_pairwise_cost(torch.full((1, 2, 2, 4, 4), 0.5), labels, 3, "ce")
    with pytest.raises(ValueError, match="shape"):
        per_class_pairwise_cost(torch.full((1, 2, 4, 4), 0.5), labels, 2, "ce")
    with pytest.raises(ValueError, match="unknown kernel"):
        per_class_pairwise_cost(labels, labels, 3, "l2")
    with pytest.raises(ValueError, match="shape"):
        squared_distance_transform(torch.zeros(4, 4, dtype=torch.bool))


@pytest.mark.parametrize("kernel", ["iou", "hausdorff"])
def test_per_class_cost_rejects_class_ids_outside_the_range(kernel: str) -> None:
    labels = torch.zeros(1, 2, 4, 4, dtype=torch.long)
    bad = labels.clone()
    bad[0, 0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"target holds class ids in \[0, 7\]"):
        per_class_pairwise_cost(labels, bad, 3, kernel)
    with pytest.raises(ValueError, match=r"pred holds class ids in \[0, 7\]"):
        per_class_pairwise_cost(bad, labels, 3, kernel)
    with pytest.raises(TypeError, match="integer class ids"):
        per_class_pairwise_cost(labels.float(), labels, 3, kernel)


def test_ce_readings_sum_and_binarized_against_torch() -> None:
    """"sum" is H W times the default mean; "binarized" is torch's binary_cross_entropy of
    (p > 0.5) against the rater mask (log clamped at -100), mean over pixels, pair by pair."""
    from probseg.metrics.functional import pairwise_cost

    rng = np.random.default_rng(8)
    b, s, r, h, w = 2, 3, 2, 7, 5
    p = torch.as_tensor(rng.random((b, s, h, w)))
    target = torch.as_tensor(rng.random((b, r, h, w)) > 0.6)
    mean = pairwise_cost(p, target, "ce")
    torch.testing.assert_close(pairwise_cost(p, target, "ce", ce_reading="sum"), mean * h * w)
    got = pairwise_cost(p, target, "ce", ce_reading="binarized")
    for i, j, k in np.ndindex(b, s, r):
        ref = torch.nn.functional.binary_cross_entropy((p[i, j] > 0.5).double(), target[i, k].double())
        assert got[i, j, k].item() == pytest.approx(ref.item(), rel=1e-6)
    with pytest.raises(ValueError, match="ce_reading must be one of"):
        pairwise_cost(p, target, "ce", ce_reading="pixel")


# ----------------------------------------------------------------------------- Hausdorff to an empty mask


def _ref_hausdorff_empty(a: np.ndarray, b: np.ndarray, rule: str) -> float:
    """Hausdorff distance with exactly one empty mask, from the definitions, by brute force over
    pixel coordinates: the diagonal, the distance to the image pixel farthest from the other mask,
    or NaN."""
    h, w = a.shape
    if rule == "diagonal":
        return math.hypot(h, w)
    if rule == "nan":
        return math.nan
    mask = a if a.any() else b
    pts = np.argwhere(mask).astype(float)
    grid = np.argwhere(np.ones((h, w), dtype=bool)).astype(float)
    return float(np.sqrt(((grid[:, None] - pts[None]) ** 2).sum(-1)).min(axis=1).max())


@pytest.mark.parametrize("rule", ["diagonal", "max_distance", "nan"])
@pytest.mark.parametrize("seed,h,w", [(0, 16, 16), (1, 12, 21)])
def test_hausdorff_empty_rules_match_their_definitions(rule: str, seed: int, h: int, w: int) -> None:
    """Pairs with exactly one empty mask follow ``hausdorff_empty`` on both computation paths;
    every other pair keeps its exact distance (both empty: 0)."""
    pred, target = _sets(seed, b=3, s=4, r=3, h=h, w=w)
    pred[0, 1] = False
    target[1, 2] = False
    pred[2, :] = False  # an image whose hypotheses are all empty
    p, t = torch.as_tensor(pred), torch.as_tensor(target)
    paths = {
        "public": pairwise_cost(p, t, "hausdorff", hausdorff_empty=rule).double().numpy(),
        "torch": kernels_module._hausdorff_cost(p, t, foreground_windows(p, t), use_scipy=False,
                                                empty_rule=rule).double().numpy(),
    }
    expect = ref_cost(pred, target, "hausdorff")
    for i in range(3):
        for j in range(4):
            for k in range(3):
                a, b = pred[i, j], target[i, k]
                if a.any() != b.any():
                    expect[i, j, k] = _ref_hausdorff_empty(a, b, rule)
    for name, got in paths.items():
        np.testing.assert_allclose(got, expect, atol=ATOL, rtol=1e-6, err_msg=name)  # NaN == NaN here


def test_hausdorff_max_distance_is_between_the_exact_distances_and_the_diagonal() -> None:
    """A mask in a corner is farther from the opposite corner than a central one; both are at
    most the diagonal."""
    h = w = 20
    corner = np.zeros((1, 2, h, w), dtype=bool)
    corner[0, 0, :2, :2] = True
    corner[0, 1, 9:11, 9:11] = True
    empty = np.zeros((1, 1, h, w), dtype=bool)
    got = _cost(corner, empty, "hausdorff", hausdorff_empty="max_distance")[0, :, 0]
    np.testing.assert_allclose(got, [math.hypot(18, 18), math.hypot(9, 9)], atol=ATOL)
    assert (got <= math.hypot(h, w)).all()


def test_hausdorff_empty_rule_is_checked() -> None:
    m = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="hausdorff_empty must be one of"):
        pairwise_cost(m, m, "hausdorff", hausdorff_empty="inf")


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8])
def test_a_set_against_itself_is_packed_once_and_equals_the_brute_force(dtype: torch.dtype,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """GED's within-set terms pass one tensor as both sets (packed once); the costs equal the
    per-pair reference and the two-tensor call."""
    pred, _ = _sets(5, b=3, s=5, r=2, h=17, w=23)
    x = torch.as_tensor(pred).to(dtype)
    packed = []
    original = kernels_module._pack
    monkeypatch.setattr(kernels_module, "_pack", lambda masks: packed.append(masks.shape) or original(masks))
    same = pairwise_cost(x, x, "iou")
    assert len(packed) == 1, "the set was packed more than once"
    np.testing.assert_allclose(same.numpy(), ref_cost(pred, pred, "iou"), rtol=1e-6, atol=ATOL)
    np.testing.assert_array_equal(same.numpy(), pairwise_cost(x, x.clone(), "iou").numpy())


@pytest.mark.parametrize("route", ["direct", "public"])
def test_squared_distances_equal_the_brute_force_on_either_scipy_route(route: str, monkeypatch: pytest.MonkeyPatch
                                                                         ) -> None:
    """The distance maps behind the CPU Hausdorff kernel, through scipy's kernel called directly
    or through its public wrapper (the route a scipy without the private entry point takes):
    min over foreground pixels of the squared distance, 0 for an empty mask."""
    if route == "public":
        monkeypatch.setattr(kernels_module, "_feature_transform", lambda: kernels_module._feature_transform_public)
    elif kernels_module._feature_transform() is kernels_module._feature_transform_public:
        pytest.skip("this scipy has no direct route (or it failed its probe): the public one is used")
    rng = np.random.default_rng(3)
    masks = rng.random((5, 9, 13)) < 0.08
    masks[0] = False  # empty
    masks[1] = False
    masks[1, 4, 6] = True  # one pixel
    got = kernels_module._squared_distances_scipy(masks)
    rows, cols = np.indices((9, 13))
    for i, mask in enumerate(masks):
        pts = np.argwhere(mask)
        if len(pts) == 0:
            expect = np.zeros((9, 13))
        else:
            expect = ((rows[..., None] - pts[:, 0]) ** 2 + (cols[..., None] - pts[:, 1]) ** 2).min(-1)
        np.testing.assert_array_equal(got[i], expect, err_msg=f"mask {i}")

"""Region losses (SDL, SJL, JML1/2, DML1/2, CTL, CFTL) and the pixel losses on probabilities,
checked against numpy formulas written straight from Wang et al., "Dice Semimetric Losses"
(eqs. 1-4, 21, 23, 29), hand computations and torch.nn.functional.kl_div."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from probseg.losses import (
    cftl,
    ctl,
    dml1,
    dml2,
    jml1,
    jml2,
    mse,
    region_loss,
    sdl,
    sjl,
    soft_cross_entropy,
    uniform_kl,
)

# --- independent references: numpy, per class, straight from the paper --------------------------


def paper_parts(kind: str, x: np.ndarray, y: np.ndarray, alpha: float = 0.5, beta: float = 0.5):
    """(numerator, denominator) of the ratio in each loss, for flat maps x, y of one class."""
    dot = float(np.sum(x * y))            # <x, y> = ||x (.) y||_1
    nx, ny = float(np.sum(np.abs(x))), float(np.sum(np.abs(y)))
    plus = float(np.sum(np.abs(x + y)))   # ||x + y||_1
    minus = float(np.sum(np.abs(x - y)))  # ||x - y||_1
    return {
        "sdl": (2 * dot, nx + ny),                           # eq. 1
        "sjl": (dot, nx + ny - dot),                         # eq. 2
        # eq. 3 and eq. 23 halved: the scale of SJL and of the soft Tversky loss, so an additive
        # smooth agrees with them on hard labels (Theorems 2 and 6 for any smooth).
        "jml1": ((plus - minus) / 2, (plus + minus) / 2),
        "jml2": (dot, dot + minus),                          # eq. 3
        "dml1": (plus - minus, plus),                        # eq. 4
        "dml2": (2 * dot, 2 * dot + minus),                  # eq. 4
        "ctl": ((plus - minus) / 2, alpha * nx + beta * ny + (1 - alpha - beta) * (plus - minus) / 2),
    }[kind]


def np_class_loss(kind, x, y, smooth=0.0, alpha=0.5, beta=0.5, gamma=1.0) -> float:
    """1 - (N + s) / (D + s) for one class (0 when N = D = 0, s = 0), to the power gamma."""
    base = "ctl" if kind == "cftl" else kind
    n, d = paper_parts(base, np.asarray(x, float).ravel(), np.asarray(y, float).ravel(), alpha, beta)
    value = 0.0 if d + smooth == 0 else 1 - (n + smooth) / (d + smooth)
    return max(value, 0.0) ** gamma  # max: a rounding -1e-17 at x = y must not go complex


def np_image_losses(kind, pred, target, **kw) -> np.ndarray:
    """(B,) mean over classes of :func:`np_class_loss`, per image."""
    p, t = pred.double().numpy(), target.double().numpy()
    return np.array([np.mean([np_class_loss(kind, p[b, k], t[b, k], **kw) for k in range(p.shape[1])])
                     for b in range(p.shape[0])])


def soft_maps(shape, seed, sum_to_one=True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    return x / x.sum(1, keepdim=True) if sum_to_one else x


def hard_maps(shape, seed) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(shape[1], (shape[0], *shape[2:]), generator=g)
    return F.one_hot(ids, shape[1]).movedim(-1, 1).double()


SHAPE = (3, 3, 4, 5)
LOSSES = {"sdl": sdl, "sjl": sjl, "jml1": jml1, "jml2": jml2, "dml1": dml1, "dml2": dml2, "ctl": ctl, "cftl": cftl}


def close(a, b, tol=1e-6) -> None:
    np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), rtol=tol, atol=tol)


# --- formulas -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(LOSSES))
@pytest.mark.parametrize("smooth", [0.0, 0.5])
def test_region_loss_matches_paper_formula_on_soft_pairs(kind: str, smooth: float) -> None:
    """Every kind on random soft pairs == numpy 1 - (N + s) / (D + s) from eqs. 1-4, 23, 29."""
    x, y = soft_maps(SHAPE, 1), soft_maps(SHAPE, 2)
    kw = {"alpha": 0.7, "beta": 0.3} if kind in ("ctl", "cftl") else {}
    if kind == "cftl":
        kw["gamma"] = 4 / 3
    got = region_loss(x, y, kind, smooth=smooth, reduction="none", **kw)
    assert got.shape == (SHAPE[0],)
    close(got, np_image_losses(kind, x, y, smooth=smooth, **kw))


def test_smooth_semantic_hand_computed() -> None:
    """x = [0.5, 1], y = [1, 0]: <x,y> = 0.5, |x| + |y| = 2.5, so SDL = 1 - (1 + s) / (2.5 + s)."""
    x = torch.tensor([0.5, 1.0]).view(1, 1, 1, 2)
    y = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    for s in (0.0, 1.0, 3.0):
        close(sdl(x, y, smooth=s), 1 - (1 + s) / (2.5 + s))
        # DML1: |x + y| - |x - y| = 2.5 - 1.5 = 1 = 2 <x, y> (y hard)
        close(dml1(x, y, smooth=s), 1 - (1 + s) / (2.5 + s))
    close(sdl(x, y), 1 - 2 / 3.5)  # default smooth is 1


# --- Theorem 2 ------------------------------------------------------------------------------------


def hard_soft_pairs():
    """(x soft, y one-hot) and (x one-hot, y soft), with x and y summing to 1 over classes."""
    soft, hard = soft_maps(SHAPE, 3), hard_maps(SHAPE, 4)
    return [(soft, hard), (hard, soft)]


@pytest.mark.parametrize("smooth", [0.0, None], ids=["smooth0", "default_smooth"])
def test_theorem2_dice_family_equal_on_hard_labels(smooth) -> None:
    """SDL == DML1 == DML2 on hard x or y, each == numpy SDL (eq. 1)."""
    kw = {} if smooth is None else {"smooth": smooth}
    s = 1.0 if smooth is None else smooth
    for x, y in hard_soft_pairs():
        expected = np_image_losses("sdl", x, y, smooth=s)
        for fn in (sdl, dml1, dml2):
            close(fn(x, y, reduction="none", **kw), expected)


@pytest.mark.parametrize("smooth", [0.0, None], ids=["smooth0", "default_smooth"])
def test_theorem2_sjl_jml2_equal_on_hard_labels(smooth) -> None:
    """SJL == JML2 on hard x or y, each == numpy SJL (eq. 2)."""
    kw = {} if smooth is None else {"smooth": smooth}
    s = 1.0 if smooth is None else smooth
    for x, y in hard_soft_pairs():
        expected = np_image_losses("sjl", x, y, smooth=s)
        for fn in (sjl, jml2):
            close(fn(x, y, reduction="none", **kw), expected)


@pytest.mark.parametrize("smooth", [
    0.0,
    None,
], ids=["smooth0", "default_smooth"])
def test_theorem2_jml1_equals_sjl_on_hard_labels(smooth) -> None:
    """JML1 == numpy SJL (eq. 2, 1 - (<x,y> + s) / (|x| + |y| - <x,y> + s)) on hard x or y."""
    kw = {} if smooth is None else {"smooth": smooth}
    s = 1.0 if smooth is None else smooth
    for x, y in hard_soft_pairs():
        close(jml1(x, y, reduction="none", **kw), np_image_losses("sjl", x, y, smooth=s))
        close(jml1(x, y, reduction="none", **kw), sjl(x, y, reduction="none", **kw))


def test_theorem2_soft_pair_where_the_losses_differ() -> None:
    """x = 0.5, y = 0.25 (one pixel): by hand SDL = 2/3, DML1 = 1/3, DML2 = 1/2, SJL = 4/5,
    JML1 = 1/2, JML2 = 2/3."""
    x = torch.full((1, 1, 1, 1), 0.5)
    y = torch.full((1, 1, 1, 1), 0.25)
    expected = {"sdl": 2 / 3, "dml1": 1 / 3, "dml2": 1 / 2, "sjl": 4 / 5, "jml1": 1 / 2, "jml2": 2 / 3}
    for kind, value in expected.items():
        close(LOSSES[kind](x, y, smooth=0), value)


# --- Theorem 3 ------------------------------------------------------------------------------------


def test_theorem3_dml1_le_dml2_on_random_soft_pairs() -> None:
    """Per image (one class), DML1 <= DML2 on 400 random soft pairs of varying sparsity."""
    g = torch.Generator().manual_seed(5)
    shape = (400, 1, 3, 3)
    keep_x = torch.rand(shape, generator=g, dtype=torch.float64) < torch.rand(shape[0], 1, 1, 1, generator=g, dtype=torch.float64)
    keep_y = torch.rand(shape, generator=g, dtype=torch.float64) < 0.7
    x = torch.rand(shape, generator=g, dtype=torch.float64) * keep_x
    y = torch.rand(shape, generator=g, dtype=torch.float64) * keep_y
    a = dml1(x, y, smooth=0, reduction="none")
    b = dml2(x, y, smooth=0, reduction="none")
    assert bool((a <= b + 1e-12).all())
    assert bool((a < b - 1e-3).any())  # not trivially equal
    close(a, np_image_losses("dml1", x, y))  # and they are the paper's DML1 / DML2
    close(b, np_image_losses("dml2", x, y))


# --- reflexivity, positivity ----------------------------------------------------------------------

REFLEXIVE = [
    ("jml1", {}), ("jml2", {}), ("dml1", {}), ("dml2", {}),
    ("ctl", {"alpha": 0.5, "beta": 0.5}), ("ctl", {"alpha": 0.7, "beta": 0.3}),
    ("ctl", {"alpha": 0.2, "beta": 1.5}), ("ctl", {"alpha": 1.0, "beta": 1.0}),
    ("cftl", {"alpha": 0.7, "beta": 0.3, "gamma": 4 / 3}), ("cftl", {"alpha": 0.3, "beta": 0.7, "gamma": 2.0}),
]


@pytest.mark.parametrize("kind,kw", REFLEXIVE, ids=[f"{k}-{i}" for i, (k, _) in enumerate(REFLEXIVE)])
@pytest.mark.parametrize("smooth", [0.0, 1.0])
def test_reflexive_and_positive_on_soft_labels(kind, kw, smooth) -> None:
    """loss(x, x) = 0 (a closed form: N = D) for soft x; loss(x, y) > 0 when y differs from x in
    one pixel of one class."""
    x = soft_maps(SHAPE, 6)
    assert float(region_loss(x, x, kind, smooth=smooth, reduction="sum", **kw)) == pytest.approx(0.0, abs=1e-6)
    y = x.clone()
    y[1, 2, 3, 4] = 0.5 * y[1, 2, 3, 4]
    out = region_loss(x, y, kind, smooth=smooth, reduction="none", **kw)
    assert float(out[1]) > 1e-6
    close(out[[0, 2]], [0, 0])
    close(out, np_image_losses(kind, x, y, smooth=smooth, **kw))


def test_sdl_and_sjl_not_reflexive_on_soft_labels() -> None:
    """x = y = 0.5 everywhere: by hand SDL = 1 - 2 * n/4 / n = 1/2 and SJL = 1 - (n/4) / (3n/4) = 2/3."""
    x = torch.full((2, 2, 3, 3), 0.5)
    close(sdl(x, x, smooth=0, reduction="none"), [0.5, 0.5])
    close(sjl(x, x, smooth=0, reduction="none"), [2 / 3, 2 / 3])
    assert float(dml1(x, x, smooth=0)) == 0.0


# --- the paper's example (Appendix A) -------------------------------------------------------------


@pytest.mark.parametrize("fn", [dml1, dml2])
def test_paper_example_semimetric_bound(fn) -> None:
    """a = [0, 1], b = [1, 1], c = [1, 0]: DML(a, c) = 1, DML(a, b) = DML(b, c) = 1/3 (so the
    triangle inequality fails and rho >= 3/2); symmetric."""
    a, b, c = (torch.tensor(v, dtype=torch.float32).view(1, 1, 1, 2) for v in ([0, 1], [1, 1], [1, 0]))
    close(fn(a, c, smooth=0), 1.0)
    close(fn(a, b, smooth=0), 1 / 3)
    close(fn(b, c, smooth=0), 1 / 3)
    close(fn(c, a, smooth=0), 1.0)
    close(fn(b, a, smooth=0), 1 / 3)
    assert float(fn(a, c, smooth=0)) > float(fn(a, b, smooth=0) + fn(b, c, smooth=0))


# --- minimizers with a soft target ----------------------------------------------------------------


def descend(fn, parametrize, steps: int = 200) -> tuple[torch.Tensor, float]:
    """Adam on 4x4 logits against a target of 0.5 for both classes; returns the final predictions."""
    target = torch.full((1, 2, 4, 4), 0.5)
    logits = (torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * 2).requires_grad_()
    opt = torch.optim.Adam([logits], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 50, 0.4)
    for _ in range(steps):
        loss = fn(parametrize(logits), target, smooth=0, classes="all")
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        p = parametrize(logits)
        return p, float(fn(p, target, smooth=0))


def test_sdl_minimizer_is_a_vertex_for_target_one_half() -> None:
    """Independent sigmoid maps: SDL with y = 0.5 is 1 - |x| / (|x| + n/2), minimal (1/3) at x = 1."""
    p, value = descend(sdl, torch.sigmoid)
    assert float(p.min()) > 0.9
    assert value == pytest.approx(1 / 3, abs=0.02)


@pytest.mark.parametrize("parametrize", [torch.sigmoid, lambda z: z.softmax(1)], ids=["sigmoid", "softmax"])
def test_dml1_minimizer_is_the_soft_target(parametrize) -> None:
    """DML1 with y = 0.5 drives x to 0.5 (its only zero)."""
    p, value = descend(dml1, parametrize)
    assert float((p - 0.5).abs().max()) < 0.02
    assert value < 0.01


# --- CTL / CFTL -----------------------------------------------------------------------------------

TVERSKY = [(0.7, 0.3), (0.3, 0.7), (0.5, 0.5), (1.0, 1.0), (0.2, 0.9)]


def np_stl(x, y, alpha, beta) -> float:
    """Soft Tversky loss, eq. 21: 1 - <x,y> / (alpha |x| + beta |y| + (1 - alpha - beta) <x,y>)."""
    dot = float(np.sum(x * y))
    return 1 - dot / (alpha * np.sum(x) + beta * np.sum(y) + (1 - alpha - beta) * dot)


@pytest.mark.parametrize("alpha,beta", TVERSKY)
def test_ctl_equals_soft_tversky_on_hard_labels(alpha, beta) -> None:
    """CTL == STL (eq. 21) when x or y is one-hot (Theorem 6), smooth = 0."""
    for x, y in hard_soft_pairs():
        xn, yn = x.numpy(), y.numpy()
        expected = [np.mean([np_stl(xn[b, k], yn[b, k], alpha, beta) for k in range(SHAPE[1])]) for b in range(SHAPE[0])]
        close(ctl(x, y, alpha=alpha, beta=beta, smooth=0, reduction="none"), expected)


def test_ctl_differs_from_soft_tversky_on_soft_labels() -> None:
    """x = y = 0.5 (one pixel), alpha = 0.7, beta = 0.3: STL = 1 - 0.25 / 0.5 = 1/2 by hand, CTL = 0."""
    x = torch.full((1, 1, 1, 1), 0.5)
    assert np_stl(np.array(0.5), np.array(0.5), 0.7, 0.3) == pytest.approx(0.5)
    assert float(ctl(x, x, alpha=0.7, beta=0.3, smooth=0)) == 0.0


@pytest.mark.parametrize("smooth", [0.0, 1.0])
def test_ctl_dice_and_jaccard_forms(smooth) -> None:
    """alpha = beta = 1 gives numpy JML1 (eq. 3) for any smooth; alpha = beta = 0.5 gives numpy
    DML1 (eq. 4) without smoothing (with it, the Tversky scale v / (|x|/2 + |y|/2) differs from
    DML1's 2v / (|x| + |y|))."""
    x, y = soft_maps(SHAPE, 7), soft_maps(SHAPE, 8)
    close(ctl(x, y, alpha=1.0, beta=1.0, smooth=smooth, reduction="none"), np_image_losses("jml1", x, y, smooth=smooth))
    if smooth == 0:
        close(ctl(x, y, alpha=0.5, beta=0.5, smooth=0, reduction="none"), np_image_losses("dml1", x, y, smooth=0))


@pytest.mark.parametrize("gamma", [4 / 3, 2.0, 0.5])
def test_cftl_is_ctl_to_the_gamma_per_class(gamma) -> None:
    """CFTL = mean over classes of CTL_c ** gamma (eq. 29), CTL_c from eq. 23 in numpy."""
    x, y = soft_maps(SHAPE, 9), soft_maps(SHAPE, 10)
    expected = np_image_losses("ctl", x, y, alpha=0.7, beta=0.3, gamma=gamma)
    close(cftl(x, y, gamma=gamma, alpha=0.7, beta=0.3, smooth=0, reduction="none"), expected)
    # and not the class mean raised to gamma
    outer = np_image_losses("ctl", x, y, alpha=0.7, beta=0.3) ** gamma
    assert np.abs(expected - outer).max() > 1e-4


def test_cftl_default_gamma_is_four_thirds() -> None:
    """cftl's default gamma: one class, so cftl == ctl ** (4/3) exactly."""
    x, y = soft_maps((2, 1, 3, 3), 11, sum_to_one=False), soft_maps((2, 1, 3, 3), 12, sum_to_one=False)
    expected = [np_class_loss("ctl", x[b, 0].numpy(), y[b, 0].numpy(), alpha=0.7, beta=0.3) ** (4 / 3) for b in range(2)]
    close(cftl(x, y, alpha=0.7, beta=0.3, smooth=0, reduction="none"), expected)


# --- options --------------------------------------------------------------------------------------


def test_focal_gamma_on_dml1_is_applied_per_class() -> None:
    """gamma = 2 on DML1 == mean_c (DML1_c)^2, not (mean_c DML1_c)^2."""
    x, y = soft_maps(SHAPE, 13), soft_maps(SHAPE, 14)
    expected = np_image_losses("dml1", x, y, gamma=2.0)
    close(dml1(x, y, gamma=2.0, smooth=0, reduction="none"), expected)
    assert np.abs(expected - np_image_losses("dml1", x, y) ** 2).max() > 1e-4


def present_batch():
    """K = 3; image 0 has no target mass in class 2, image 1 has all classes."""
    x = soft_maps((2, 3, 3, 3), 15)
    y = soft_maps((2, 3, 3, 3), 16)
    y[0, 2] = 0
    y[0] = y[0] / y[0].sum(0, keepdim=True)
    return x, y


def test_classes_present_averages_over_target_classes_per_image() -> None:
    """Image 0: mean of the numpy DML1 of classes 0, 1 only; image 1: of all three."""
    x, y = present_batch()
    xn, yn = x.numpy(), y.numpy()
    per = [[np_class_loss("dml1", xn[b, k], yn[b, k]) for k in range(3)] for b in range(2)]
    expected = [np.mean(per[0][:2]), np.mean(per[1])]
    got = dml1(x, y, smooth=0, classes="present", reduction="none")
    close(got, expected)
    assert float(got[0]) != pytest.approx(np.mean(per[0]), abs=1e-4)  # "all" counts class 2 too
    close(dml1(x, y, smooth=0, classes="all", reduction="none"), [np.mean(p) for p in per])


@pytest.mark.parametrize("classes", ["all", "present"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_per_image_false_pools_over_the_batch(classes, reduction) -> None:
    """per_image=False == numpy DML1 on the batch's images concatenated side by side (one value,
    whatever the reduction); class 2 is present in the pooled batch."""
    x, y = present_batch()
    xn, yn = x.numpy(), y.numpy()
    cat_x, cat_y = np.concatenate(list(xn), axis=-1), np.concatenate(list(yn), axis=-1)  # (K, H, 2W)
    expected = np.mean([np_class_loss("dml1", cat_x[k], cat_y[k], smooth=1.0) for k in range(3)])
    got = dml1(x, y, per_image=False, classes=classes, reduction=reduction)
    assert got.shape == ()
    close(got, expected)


def test_per_image_false_present_skips_classes_absent_from_the_whole_batch() -> None:
    """Class 2 empty in every target: pooled "present" averages classes 0 and 1 only."""
    x = soft_maps((2, 3, 2, 2), 17)
    y = soft_maps((2, 3, 2, 2), 18)
    y[:, 2] = 0
    y = y / y.sum(1, keepdim=True)
    cx, cy = np.concatenate(list(x.numpy()), -1), np.concatenate(list(y.numpy()), -1)
    expected = np.mean([np_class_loss("sdl", cx[k], cy[k]) for k in range(2)])
    close(sdl(x, y, smooth=0, per_image=False, classes="present"), expected)


def test_per_image_false_with_reduction_none_raises() -> None:
    x = soft_maps((2, 2, 2, 2), 19)
    with pytest.raises(ValueError, match="per_image"):
        dml1(x, x, per_image=False, reduction="none")


def test_reductions_shapes_and_values() -> None:
    """none: (B,) numpy per-image values; mean: their mean; sum: their sum."""
    x, y = soft_maps(SHAPE, 20), soft_maps(SHAPE, 21)
    expected = np_image_losses("dml2", x, y, smooth=1.0)
    none = dml2(x, y, reduction="none")
    assert none.shape == (SHAPE[0],)
    close(none, expected)
    mean, total = dml2(x, y), dml2(x, y, reduction="sum")
    assert mean.shape == () and total.shape == ()
    close(mean, expected.mean())
    close(total, expected.sum())
    with pytest.raises(ValueError, match="reduction"):
        dml2(x, y, reduction="max")


def test_class_empty_in_prediction_and_target_costs_zero() -> None:
    """K = 2, class 1 empty everywhere, x = y in class 0, smooth = 0: both classes cost 0 (not NaN)."""
    x = torch.zeros(1, 2, 2, 2)
    x[:, 0] = 1
    for fn in LOSSES.values():
        out = fn(x, x.clone(), smooth=0)
        assert float(out) == 0.0


# --- uniform KL, soft CE, MSE ---------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3])
def test_uniform_kl_is_kl_from_uniform_plus_log_k(k: int) -> None:
    """Per pixel, -mean_c log p_c == KL(u || p) + log K, with KL from F.kl_div(log p, u)."""
    g = torch.Generator().manual_seed(22 + k)
    p = torch.randn(2, k, 3, 4, generator=g, dtype=torch.float64).softmax(1)
    u = torch.full_like(p, 1 / k)
    kl = F.kl_div(p.log(), u, reduction="none").sum(1)  # sum_c u (log u - log p), (B, H, W)
    per_pixel = kl + math.log(k)
    close(uniform_kl(p, reduction="none"), per_pixel.mean((1, 2)))
    close(uniform_kl(p), per_pixel.mean())
    close(uniform_kl(p, reduction="sum", pixel_reduction="sum"), per_pixel.sum())
    close(uniform_kl(u), math.log(k))  # the minimum, at the uniform map: KL = 0


def test_soft_cross_entropy_hand_formula() -> None:
    """-sum_c y_c log p_c per pixel; pixel mean by default, batch mean; eps floors log 0."""
    p, y = soft_maps(SHAPE, 24), soft_maps(SHAPE, 25)
    per_pixel = -(y.numpy() * np.log(p.numpy())).sum(1)
    close(soft_cross_entropy(p, y, reduction="none"), per_pixel.mean((1, 2)))
    close(soft_cross_entropy(p, y), per_pixel.mean())
    close(soft_cross_entropy(p, y, reduction="sum", pixel_reduction="sum"), per_pixel.sum())
    zero = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)
    one = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    close(soft_cross_entropy(zero, one, eps=1e-4), -math.log(1e-4))


def test_mse_hand_formula() -> None:
    """sum over classes of (p - y)^2, mean over pixels; one pixel by hand: (0.2-1)^2 + (0.8-0)^2 = 1.28."""
    p, y = soft_maps(SHAPE, 26), soft_maps(SHAPE, 27)
    per_pixel = ((p.numpy() - y.numpy()) ** 2).sum(1)
    close(mse(p, y, reduction="none"), per_pixel.mean((1, 2)))
    close(mse(p, y, reduction="sum"), per_pixel.mean((1, 2)).sum())
    close(mse(p, y, pixel_reduction="sum"), per_pixel.sum((1, 2)).mean())
    close(mse(torch.tensor([0.2, 0.8]).view(1, 2, 1, 1), torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)), 1.28)


# --- bad input ------------------------------------------------------------------------------------

PAIR_FNS = [dml1, sdl, cftl, soft_cross_entropy, mse]


@pytest.mark.parametrize("fn", PAIR_FNS, ids=lambda f: f.__name__)
def test_bad_probabilities_raise(fn) -> None:
    good = torch.full((1, 2, 2, 2), 0.5)
    for bad, msg in ((good + 0.6, r"\[0, 1\]"), (good - 0.6, r"\[0, 1\]")):
        with pytest.raises(ValueError, match=msg):
            fn(bad, good)
        with pytest.raises(ValueError, match=msg):
            fn(good, bad)
    nan = good.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fn(nan, good)
    with pytest.raises(ValueError, match="NaN"):
        fn(good, nan)


@pytest.mark.parametrize("fn", PAIR_FNS, ids=lambda f: f.__name__)
def test_shape_rank_and_class_mismatch_raise(fn) -> None:
    pred = torch.full((2, 2, 3, 4), 0.5)
    with pytest.raises(ValueError, match="differ in shape"):
        fn(pred, torch.full((2, 2, 3, 5), 0.5))
    with pytest.raises(ValueError, match="differ in classes K"):
        fn(pred, torch.full((2, 3, 3, 4), 1 / 3))
    with pytest.raises(ValueError, match=r"\(B, K, H, W\)"):
        fn(pred[0], pred[0])
    with pytest.raises(ValueError, match=r"\(B, K, H, W\)"):
        fn(pred, pred[0])


def test_class_and_width_mismatch_is_reported_as_shape() -> None:
    """K and W both differ: the message must not claim only the classes K differ."""
    with pytest.raises(ValueError, match="differ in shape"):
        dml1(torch.full((1, 2, 3, 4), 0.5), torch.full((1, 3, 3, 5), 1 / 3))


def test_uniform_kl_bad_input_raises() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        uniform_kl(torch.full((1, 2, 2, 2), 1.5))
    with pytest.raises(ValueError, match=r"\(B, K, H, W\)"):
        uniform_kl(torch.full((2, 2, 2), 0.5))


def test_bad_options_raise() -> None:
    x = torch.full((1, 2, 2, 2), 0.5)
    with pytest.raises(ValueError, match="unknown region loss 'dice'"):
        region_loss(x, x, "dice")
    with pytest.raises(ValueError, match="classes must be one of"):
        region_loss(x, x, "dml1", classes="some")
    for bad in ({"smooth": -1.0}, {"gamma": 0.0}, {"alpha": -0.1}, {"beta": -0.1}):
        with pytest.raises(ValueError, match="smooth >= 0"):
            region_loss(x, x, "ctl", **bad)


@pytest.mark.parametrize("gamma", [0.5, 0.75])
def test_focal_exponent_below_one_has_finite_gradients_at_a_perfect_fit(gamma: float) -> None:
    """x ** gamma has an infinite slope at 0 for gamma < 1; a perfectly fitted batch must still
    give loss 0 and finite gradients (the focal Tversky convention uses 0.75)."""
    target = torch.zeros(2, 2, 4, 4)
    target[:, 1, :2] = 1
    target[:, 0] = 1 - target[:, 1]
    logits = (60 * target - 30).requires_grad_()
    loss = ctl(logits.softmax(1), target, gamma=gamma, alpha=0.7, beta=0.3, smooth=0)
    loss.backward()
    assert float(loss.detach()) == 0.0 and bool(torch.isfinite(logits.grad).all())

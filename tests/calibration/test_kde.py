"""KDE recalibration (probseg.calibration.kde) against independent computations: scipy's Beta and
Dirichlet densities, python loops of the estimator's formula and of the region's neighbourhood, and
synthetic data with a known E[y | f]."""

from __future__ import annotations

import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

import probseg.calibration.kde as kde_module
from probseg.calibration import (
    PROB_FLOOR,
    KDECalibration,
    beta_log_kernel,
    calibration_region,
    dirichlet_log_kernel,
    kde_calibrate,
    kde_estimate,
    sample_key_points,
)

from tests.tolerances import gamma, unit_roundoff

ROOT = Path(__file__).resolve().parents[2]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_simplex(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    return rng.dirichlet(np.ones(k), size=n)


def _ref_log_kernel(x: np.ndarray, centre: np.ndarray, h: float) -> float:
    """log Dirichlet(alpha = centre / h + 1) density at x, with math.lgamma, one pair at a time."""
    alpha = centre / h + 1
    value = math.lgamma(alpha.sum()) - sum(math.lgamma(a) for a in alpha)
    return value + sum((a - 1) * math.log(max(xk, PROB_FLOOR)) for a, xk in zip(alpha, x, strict=True))


def _ref_kde(x: np.ndarray, keys: np.ndarray, labels: np.ndarray, h: float, weights: np.ndarray | None) -> np.ndarray:
    """sum_i w_i k(x_j, key_i) y_i / sum_i w_i k(x_j, key_i), a python loop in log-sum-exp form."""
    weights = np.ones(len(keys)) if weights is None else weights
    out = np.zeros((len(x), labels.shape[1]))
    for j in range(len(x)):
        logs = [_ref_log_kernel(x[j], keys[i], h) + math.log(weights[i]) for i in range(len(keys))]
        top = max(logs)
        num = sum(math.exp(v - top) * labels[i] for i, v in enumerate(logs))
        out[j] = num / sum(math.exp(v - top) for v in logs)
    return out


def _binned_ece(fg: torch.Tensor, y: torch.Tensor, bins: int = 15) -> float:
    """Foreground ECE: sum over equal-width bins of (n_b / n) |mean(y) - mean(p)|."""
    p, y = fg.flatten().double(), y.flatten().double()
    which = (p * bins).long().clamp(max=bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += float(sel.sum()) * abs(float(p[sel].mean() - y[sel].mean()))
    return total / p.numel()


def _binary(fg: torch.Tensor) -> torch.Tensor:
    """(B, H, W) foreground probabilities -> (B, 2, H, W)."""
    return torch.stack([1 - fg, fg], 1)


def _multiclass(seed: int, b: int = 2, k: int = 3, h: int = 10, w: int = 12, dtype=torch.float32):
    """(B, K, H, W) softmax probabilities and (B, H, W) blocky labels that mostly agree with them."""
    g = _gen(seed)
    coarse = torch.randint(0, k, (b, 1, (h + 3) // 4, (w + 3) // 4), generator=g).float()
    labels = torch.nn.functional.interpolate(coarse, size=(h, w), mode="nearest")[:, 0].long()
    logits = 2 * torch.nn.functional.one_hot(labels, k).movedim(-1, 1) + torch.randn(b, k, h, w, generator=g)
    return logits.to(dtype).softmax(dim=1), labels


def _estimate_rounding_bound(probs: torch.Tensor, bandwidth: float, n_key: int, max_weight: float,
                             dtype: torch.dtype) -> float:
    """Bound on how far two evaluation orders of :func:`kde_estimate` (chunked or whole, any CPU
    matmul) can differ, from the rounding of ``dtype``.

    Each log kernel value is ``const_i + sum_k log f_jk (alpha_ik - 1)``: K + 1 terms whose
    absolute values add to at most S = lgamma(1/h + K) + 0.13 K + log(max weight) + max|log f| / h
    (|lgamma| >= -0.13 on [1, inf), and the alpha_ik - 1 = key_ik / h add to 1 / h). It is off by
    delta <= gamma_{K+1} S. Subtracting the row maximum doubles that and rounds once more (u 2S);
    exp rounds (2u); the numerator and denominator sum n_key positive terms (gamma_{n_key}) and
    the division rounds (u). The estimate is <= 1, so its absolute error is at most the relative
    error, and two paths differ by at most twice one path's error.
    """
    u = unit_roundoff(dtype)
    k = probs.shape[1]
    floor = torch.finfo(torch.float32).tiny  # the estimator's log floor (PROB_FLOOR)
    max_log = float(probs.double().clamp_min(floor).log().abs().max())
    scale = math.lgamma(1 / bandwidth + k) + 0.13 * k + math.log(max_weight) + max_log / bandwidth
    weight_error = 2 * gamma(k + 1, dtype) * scale + 2 * u * scale + 2 * u
    return 2 * (2 * (weight_error + gamma(n_key, dtype)) + u)


# ----------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("h", [0.5, 0.1, 0.02])
def test_beta_kernel_is_the_beta_density(h: float) -> None:
    x = torch.linspace(0, 1, 41, dtype=torch.float64)
    centres = torch.tensor([0.0, 0.1, 0.5, 0.93, 1.0], dtype=torch.float64)
    ours = beta_log_kernel(x, centres, h).exp().numpy()
    for i, c in enumerate(centres.tolist()):
        ref = stats.beta.pdf(x.numpy(), c / h + 1, (1 - c) / h + 1)
        zero = ref == 0  # f = 0 or 1 with alpha > 1: the floored log leaves a tiny positive density
        np.testing.assert_allclose(ours[~zero, i], ref[~zero], rtol=1e-9, atol=1e-12)
        assert (ours[zero, i] < 1e-4).all()


def test_beta_kernel_small_bandwidth_in_log_space() -> None:
    h = 1e-3
    x = torch.linspace(0, 1, 51, dtype=torch.float64)
    centres = torch.tensor([0.0, 0.02, 0.5, 0.77, 1.0], dtype=torch.float64)
    ours = beta_log_kernel(x, centres, h).numpy()
    for i, c in enumerate(centres.tolist()):
        ref = stats.beta.logpdf(x.numpy(), c / h + 1, (1 - c) / h + 1)
        finite = np.isfinite(ref)
        np.testing.assert_allclose(ours[finite, i], ref[finite], rtol=1e-10, atol=1e-7)
        # log 0 is -inf for scipy; the floored log gives a finite, hugely negative value
        assert np.isfinite(ours[:, i]).all() and (ours[~finite, i] < -1e3).all()
    # float32 (the default compute dtype) stays close in log space
    ours32 = beta_log_kernel(x.float(), centres.float(), h).double().numpy()
    interior = slice(1, -1)
    np.testing.assert_allclose(ours32[interior], ours[interior], rtol=1e-5, atol=0.05)


@pytest.mark.parametrize("k", [3, 4])
@pytest.mark.parametrize("h", [0.3, 0.05, 1e-3])
def test_dirichlet_kernel_is_the_dirichlet_density(k: int, h: float) -> None:
    rng = np.random.default_rng(k)
    x, centres = _random_simplex(rng, 7, k), _random_simplex(rng, 5, k)
    ours = dirichlet_log_kernel(torch.from_numpy(x), torch.from_numpy(centres), h).numpy()
    assert ours.shape == (7, 5)
    for i in range(5):
        for j in range(7):
            ref = stats.dirichlet.logpdf(x[j], centres[i] / h + 1)
            assert ours[j, i] == pytest.approx(ref, rel=1e-9, abs=1e-6)


def test_beta_kernel_is_the_two_class_dirichlet_kernel() -> None:
    g = _gen(0)
    p, c = torch.rand(9, generator=g, dtype=torch.float64), torch.rand(4, generator=g, dtype=torch.float64)
    pairs, key_pairs = torch.stack([1 - p, p], 1), torch.stack([1 - c, c], 1)
    torch.testing.assert_close(beta_log_kernel(p, c, 0.05), dirichlet_log_kernel(pairs, key_pairs, 0.05))


# ----------------------------------------------------------------------------- estimator


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("h", [0.2, 0.01])
@pytest.mark.parametrize("soft", [False, True])
def test_kde_estimate_matches_a_loop_of_the_formula(weighted: bool, h: float, soft: bool) -> None:
    rng = np.random.default_rng(int(weighted) + 2 * int(soft))
    k, n, m = 3, 6, 9
    x, keys = _random_simplex(rng, n, k), _random_simplex(rng, m, k)
    ids = rng.integers(0, k, m)
    labels = _random_simplex(rng, m, k) if soft else np.eye(k)[ids]
    weights = rng.uniform(0.5, 20, m) if weighted else None
    ours = kde_estimate(
        torch.from_numpy(x),
        torch.from_numpy(keys),
        torch.from_numpy(labels),
        h,
        None if weights is None else torch.from_numpy(weights),
    )
    assert ours.dtype == torch.float64 and ours.shape == (n, k)
    np.testing.assert_allclose(ours.numpy(), _ref_kde(x, keys, labels, h, weights), rtol=1e-9, atol=1e-12)
    if not soft:  # integer class ids are the same as their one-hot rows
        by_ids = kde_estimate(
            torch.from_numpy(x),
            torch.from_numpy(keys),
            torch.from_numpy(ids),
            h,
            None if weights is None else torch.from_numpy(weights),
        )
        torch.testing.assert_close(by_ids, ours)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kde_estimate_chunks_rows(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """Three rows per chunk against one block: equal within the dtype's rounding bound (the
    matmuls differ in shape, so the CPU orders their sums differently); in float64 the bound is
    below 1e-11, tight enough to catch any row mix-up between chunks."""
    g = _gen(3)
    x, keys = torch.rand(50, 3, generator=g).softmax(1), torch.rand(40, 3, generator=g).softmax(1)
    labels = torch.randint(0, 3, (40,), generator=g)
    weights = torch.rand(40, generator=g) + 0.5
    x, keys, weights = x.to(dtype), keys.to(dtype), weights.to(dtype)
    whole = kde_estimate(x, keys, labels, 0.05, weights)
    assert kde_module._rows_per_chunk(40, dtype, torch.device("cpu")) >= 50  # one chunk above
    monkeypatch.setattr(kde_module, "_CPU_CHUNK_BYTES", 3 * 40 * torch.finfo(dtype).bits // 8)
    assert kde_module._rows_per_chunk(40, dtype, torch.device("cpu")) == 3
    tol = _estimate_rounding_bound(x, 0.05, 40, float(weights.max()), dtype)
    assert tol < (1e-11 if dtype == torch.float64 else 1e-2)
    torch.testing.assert_close(kde_estimate(x, keys, labels, 0.05, weights), whole, rtol=0, atol=tol)


def test_chunk_size_is_bounded() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert kde_module._rows_per_chunk(1024, torch.float32, cpu) * 1024 * 4 <= 4 * 2**20
    assert kde_module._rows_per_chunk(1024, torch.float32, cuda) * 1024 * 4 == 64 * 2**20
    assert kde_module._rows_per_chunk(1024, torch.float64, cuda) * 1024 * 8 == 64 * 2**20
    assert kde_module._rows_per_chunk(10**9, torch.float32, cpu) == 1


def test_kde_recovers_a_known_miscalibration() -> None:
    """f ~ U(0, 1), y ~ Bernoulli(f^2): the estimate approaches f^2 as n_key grows and the ECE drops."""
    g = _gen(0)
    fg = torch.rand(1, 64, 64, generator=g)
    y = (torch.rand(1, 64, 64, generator=g) < fg**2).long()
    truth = fg**2
    errors = {}
    for n_key in (64, 512, 4096):
        runs = [kde_calibrate(_binary(fg), y, 0.02, n_key, region="all", generator=_gen(s)) for s in range(4)]
        errors[n_key] = float(np.mean([(out[:, 1] - truth).abs().mean() for out in runs]))
    assert errors[64] > 1.5 * errors[512] > 2.25 * errors[4096]
    assert errors[4096] < 0.015
    before, after = _binned_ece(fg, y), _binned_ece(runs[0][:, 1], y)
    assert before > 0.15 and after < before / 4


def test_importance_weights_remove_the_class_balancing_bias() -> None:
    """A rare foreground (5 %) and a calibrated network: balanced key points without weights give
    about 10x the true probability; the weighted estimate stays on the truth and on the
    full-batch KDE (every pixel a key point)."""
    g = _gen(1)
    fg = 0.1 * torch.rand(1, 64, 64, generator=g, dtype=torch.float64)
    y = (torch.rand(1, 64, 64, generator=g, dtype=torch.float64) < fg).long()
    assert 0.03 < y.double().mean() < 0.07
    h = 0.005
    weighted = kde_calibrate(_binary(fg), y, h, 512, region="all", generator=_gen(0))[:, 1]
    unweighted = kde_calibrate(_binary(fg), y, h, 512, region="all", importance_weights=False, generator=_gen(0))[:, 1]
    full = kde_estimate(
        _binary(fg).permute(0, 2, 3, 1).reshape(-1, 2), _binary(fg).permute(0, 2, 3, 1).reshape(-1, 2), y.reshape(-1), h
    )[:, 1].view_as(fg)
    assert (weighted - fg).abs().mean() < 0.015
    assert (unweighted - fg).abs().mean() > 0.2 and unweighted.mean() > 4 * fg.mean()
    assert (weighted - full).abs().mean() < 0.01
    assert (unweighted - full).abs().mean() > 0.2


# ----------------------------------------------------------------------------- key points


def _rare_labels(seed: int) -> torch.Tensor:
    labels = torch.tensor([0] * 1000 + [2] * 5 + [5] * 50)
    return labels[torch.randperm(len(labels), generator=_gen(seed))]


def test_key_points_are_class_balanced_and_weighted() -> None:
    labels = _rare_labels(0)
    idx, w = sample_key_points(labels, 60, _gen(1))  # 3 classes present: ceil(60 / 3) = 20 each
    assert idx.dtype == torch.long and w.dtype == torch.float32 and idx.shape == w.shape
    assert len(set(idx.tolist())) == len(idx)  # without replacement
    counts = Counter(labels[idx].tolist())
    assert counts == {0: 20, 2: 5, 5: 20}  # all 5 of the rare class; absent classes get none
    expected = {0: 1000 / 20, 2: 1.0, 5: 50 / 20}
    assert w.tolist() == pytest.approx([expected[c] for c in labels[idx].tolist()])
    assert labels[idx].tolist() == sorted(labels[idx].tolist())  # grouped by class id
    # weights times key points per class recover every class's pixel count
    for c, n_c in ((0, 1000), (2, 5), (5, 50)):
        assert float(w[labels[idx] == c].sum()) == pytest.approx(n_c)


def test_key_points_ceil_and_extremes() -> None:
    labels = _rare_labels(0)
    idx, w = sample_key_points(labels, 1)  # ceil(1 / 3) = 1 per present class
    assert Counter(labels[idx].tolist()) == {0: 1, 2: 1, 5: 1}
    idx, _ = sample_key_points(labels, 31)  # ceil(31 / 3) = 11
    assert Counter(labels[idx].tolist()) == {0: 11, 2: 5, 5: 11}
    idx, w = sample_key_points(labels, 10**6)  # more than every class: all pixels, weight 1
    assert sorted(idx.tolist()) == list(range(len(labels))) and bool((w == 1).all())


def test_key_points_are_reproducible() -> None:
    labels = _rare_labels(0)
    a, _ = sample_key_points(labels, 60, _gen(7))
    b, _ = sample_key_points(labels, 60, _gen(7))
    c, _ = sample_key_points(labels, 60, _gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------------------------- region


def _ref_region(probs: np.ndarray, labels: np.ndarray, width: int) -> np.ndarray:
    b, _, h, w = probs.shape
    pred = probs.argmax(1)
    out = np.zeros((b, h, w), dtype=bool)
    for n in range(b):
        for i in range(h):
            for j in range(w):
                window = labels[n, max(0, i - width) : i + width + 1, max(0, j - width) : j + width + 1]
                out[n, i, j] = pred[n, i, j] != labels[n, i, j] or bool((window != labels[n, i, j]).any())
    return out


@pytest.mark.parametrize("width", [0, 1, 2])
def test_region_matches_a_neighbourhood_loop(width: int) -> None:
    probs, labels = _multiclass(width, b=3, k=3, h=9, w=11)
    ours = calibration_region(probs, labels, width)
    assert ours.dtype == torch.bool and ours.shape == labels.shape
    np.testing.assert_array_equal(ours.numpy(), _ref_region(probs.numpy(), labels.numpy(), width))
    assert 0 < int(ours.sum()) < ours.numel()


def test_region_does_not_leak_across_images() -> None:
    labels = torch.zeros(2, 6, 6, dtype=torch.long)
    labels[0, :, 3:] = 1  # image 0: a vertical boundary; image 1: all class 0
    probs = torch.nn.functional.one_hot(labels, 2).movedim(-1, 1).double()
    for width in (1, 3):
        region = calibration_region(probs, labels, width)
        assert not region[1].any()
        assert region[0].any(dim=0)[3 - width : 3 + width].all() and not region[0, :, : 3 - width].any()
    flipped = calibration_region(probs.flip(0), labels.flip(0), 1)
    assert not flipped[0].any()


# ----------------------------------------------------------------------------- kde_calibrate


def _check_probability_map(out: torch.Tensor, like: torch.Tensor) -> None:
    assert out.shape == like.shape and out.dtype == like.dtype
    assert bool((out >= 0).all()) and bool((out <= 1).all())
    # each entry is num_k / sum(num), one rounding of the dtype each: the K entries add to 1
    # within K roundings of the dtype (plus the rounding of the denominator's sum)
    k = out.shape[1]
    tol = 2 * gamma(k, out.dtype)
    torch.testing.assert_close(out.double().sum(1), torch.ones_like(out[:, 0], dtype=torch.float64), rtol=0, atol=tol)


def test_region_all_changes_every_pixel_and_boundary_keeps_the_rest() -> None:
    probs, labels = _multiclass(5, b=2, k=3, h=12, w=14)
    everywhere = kde_calibrate(probs, labels, 0.05, 64, region="all", generator=_gen(0))
    _check_probability_map(everywhere, probs)
    assert bool((everywhere != probs).any(dim=1).all())

    out = kde_calibrate(probs, labels, 0.05, 64, generator=_gen(0))
    _check_probability_map(out, probs)
    region = calibration_region(probs, labels, 1)
    assert 0 < int(region.sum()) < region.numel()
    assert torch.equal(out.permute(0, 2, 3, 1)[~region], probs.permute(0, 2, 3, 1)[~region])  # bit-identical
    # inside: kde_estimate at those pixels with the same key points (same seed)
    flat, ids = probs.permute(0, 2, 3, 1).reshape(-1, 3), labels.reshape(-1)
    idx, w = sample_key_points(ids, 64, _gen(0))
    expected = kde_estimate(probs.permute(0, 2, 3, 1)[region], flat[idx], ids[idx], 0.05, w)
    torch.testing.assert_close(out.permute(0, 2, 3, 1)[region], expected)
    torch.testing.assert_close(everywhere.permute(0, 2, 3, 1)[region], expected)


def test_boundary_width_zero_is_misclassified_only() -> None:
    probs, labels = _multiclass(6)
    out = kde_calibrate(probs, labels, 0.05, 32, boundary_width=0, generator=_gen(0))
    changed = (out != probs).any(dim=1)
    assert torch.equal(changed, probs.argmax(1) != labels)


def test_soft_targets_use_their_argmax_for_balancing_and_region() -> None:
    probs, labels = _multiclass(7, k=3)
    soft = (0.7 * torch.nn.functional.one_hot(labels, 3).movedim(-1, 1) + 0.1).float()
    out = kde_calibrate(probs, soft, 0.05, 48, generator=_gen(2))
    _check_probability_map(out, probs)
    region = calibration_region(probs, labels)
    flat = probs.permute(0, 2, 3, 1).reshape(-1, 3)
    idx, w = sample_key_points(labels.reshape(-1), 48, _gen(2))
    expected = kde_estimate(flat[region.reshape(-1)], flat[idx], soft.permute(0, 2, 3, 1).reshape(-1, 3)[idx], 0.05, w)
    torch.testing.assert_close(out.permute(0, 2, 3, 1)[region], expected)
    # soft labels are not one-hot: the estimate is not either
    hard = kde_calibrate(probs, labels, 0.05, 48, generator=_gen(2))
    assert not torch.allclose(out, hard)


def test_dtypes_float64_half_and_autocast() -> None:
    probs, labels = _multiclass(8, k=2)
    ref = kde_calibrate(probs, labels, 1e-3, 64, region="all", generator=_gen(0))
    out64 = kde_calibrate(probs.double(), labels, 1e-3, 64, region="all", generator=_gen(0))
    _check_probability_map(out64, probs.double())
    torch.testing.assert_close(out64.float(), ref, atol=1e-3, rtol=0)
    for half in (torch.float16, torch.bfloat16):
        low = probs.to(half)
        out = kde_calibrate(low, labels, 1e-3, 64, region="all", generator=_gen(0))
        assert out.dtype == half
        upcast = kde_calibrate(low.float(), labels, 1e-3, 64, region="all", generator=_gen(0))
        torch.testing.assert_close(out, upcast.to(half))  # computed in float32, rounded once
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = kde_calibrate(probs, labels, 1e-3, 64, region="all", generator=_gen(0))
    assert torch.equal(auto, ref)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunking_gives_the_same_calibration(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """Chunks of ~7 rows against one block. The matmuls differ in shape, so the CPU blocks their
    sums differently: the two agree within the rounding bound of the dtype, not bitwise. In
    float64 the bound is below 1e-11, so a chunk boundary that mixed up rows would show."""
    probs, labels = _multiclass(9, b=2, k=3, h=16, w=16, dtype=dtype)
    whole = kde_calibrate(probs, labels, 0.01, 100, region="all", generator=_gen(0))
    monkeypatch.setattr(kde_module, "_CPU_CHUNK_BYTES", 7 * 102 * 8)  # ~7 rows of the kernel at a time
    monkeypatch.setattr(kde_module, "_CHUNK_BYTES", 7 * 102 * 8)
    assert kde_module._rows_per_chunk(100, dtype, torch.device("cpu")) < 16
    chunked = kde_calibrate(probs, labels, 0.01, 100, region="all", generator=_gen(0))
    # the largest importance weight is n_c / m_c <= the pixel count
    tol = _estimate_rounding_bound(probs.movedim(1, -1).reshape(-1, 3), 0.01, 100, labels.numel(), dtype)
    assert tol < (1e-11 if dtype == torch.float64 else 1e-2)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=tol)


def test_inputs_that_require_grad_are_detached() -> None:
    logits, labels = torch.randn(2, 2, 8, 8, requires_grad=True), torch.randint(0, 2, (2, 8, 8))
    out = kde_calibrate(logits.softmax(1), labels, 0.05, 16, generator=_gen(0))
    assert not out.requires_grad
    _check_probability_map(out, logits.detach())


def test_a_class_missing_from_the_batch_gets_probability_zero_in_the_region() -> None:
    """Class 2 never appears in the labels: no key point carries it, so its estimate is 0."""
    probs, _ = _multiclass(10, k=3)
    labels = torch.randint(0, 2, probs[:, 0].shape, generator=_gen(0))
    out = kde_calibrate(probs, labels, 0.05, 16, region="all", generator=_gen(0))
    _check_probability_map(out, probs)
    assert bool((out[:, 2] == 0).all())


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("bandwidth", [0, -1e-3, float("nan"), float("inf"), True, "0.1"])
def test_bad_bandwidth(bandwidth) -> None:
    probs, labels = _multiclass(0)
    with pytest.raises(ValueError, match="bandwidth"):
        kde_calibrate(probs, labels, bandwidth)
    with pytest.raises(ValueError, match="bandwidth"):
        KDECalibration(bandwidth=bandwidth)
    with pytest.raises(ValueError, match="bandwidth"):
        dirichlet_log_kernel(probs[0, :, 0].T, probs[0, :, 1].T, bandwidth)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_key": 0}, "n_key"),
        ({"n_key": 2.5}, "n_key"),
        ({"region": "edges"}, "region"),
        ({"boundary_width": -1}, "boundary_width"),
    ],
)
def test_bad_settings(kwargs: dict, match: str) -> None:
    probs, labels = _multiclass(0)
    with pytest.raises(ValueError, match=match):
        kde_calibrate(probs, labels, **kwargs)
    with pytest.raises(ValueError, match=match):
        KDECalibration(**kwargs)
    with pytest.raises(TypeError, match="importance_weights"):
        KDECalibration(importance_weights="yes")


def test_bad_shapes_and_values() -> None:
    probs, labels = _multiclass(0, b=2, k=3, h=6, w=7)
    with pytest.raises(ValueError, match=r"probs must have shape \(B, K, H, W\).*\(3, 6, 7\)"):
        kde_calibrate(probs[0], labels)
    with pytest.raises(ValueError, match=r"target must have shape .*\(2, 6, 8\)"):
        kde_calibrate(probs, torch.zeros(2, 6, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="target holds class ids"):
        kde_calibrate(probs, labels + 3)
    with pytest.raises(ValueError, match="probs must lie in"):
        kde_calibrate(probs * 2, labels)
    with pytest.raises(ValueError, match="probs must sum to 1"):
        kde_calibrate(probs * 0.5, labels)
    with pytest.raises(ValueError, match="probs holds NaN"):
        kde_calibrate(torch.full_like(probs, float("nan")), labels)
    with pytest.raises(ValueError, match="target must sum to 1"):
        kde_calibrate(probs, probs * 0.5)
    with pytest.raises(TypeError, match="target must hold integer class ids"):
        kde_calibrate(probs, labels.float())
    with pytest.raises(ValueError, match=r"key_probs must have shape \(m, K\) = \(m, 3\)"):
        dirichlet_log_kernel(torch.full((4, 3), 1 / 3), torch.full((4, 2), 0.5), 0.1)
    with pytest.raises(ValueError, match=r"probs must have shape \(n,\)"):
        beta_log_kernel(torch.rand(4, 2), torch.rand(3), 0.1)
    keys = torch.full((5, 3), 1 / 3)
    with pytest.raises(ValueError, match=r"key_labels must have shape \(m, K\) = \(5, 3\)"):
        kde_estimate(keys, keys, torch.full((5, 2), 0.5), 0.1)
    with pytest.raises(ValueError, match=r"key_weights must have shape \(m,\) = \(5,\)"):
        kde_estimate(keys, keys, torch.zeros(5, dtype=torch.long), 0.1, torch.ones(4))
    with pytest.raises(ValueError, match="key_weights must be positive"):
        kde_estimate(keys, keys, torch.zeros(5, dtype=torch.long), 0.1, torch.zeros(5))
    with pytest.raises(ValueError, match=r"labels must have shape \(B, H, W\)"):
        calibration_region(probs, labels[0])
    with pytest.raises(ValueError, match=r"labels must have shape \(n,\)"):
        sample_key_points(labels, 10)
    with pytest.raises(TypeError, match="labels must hold integer class ids"):
        sample_key_points(labels.reshape(-1).float(), 10)


# ----------------------------------------------------------------------------- KDECalibration


def test_calibration_object() -> None:
    probs, labels = _multiclass(11, k=3)
    calib = KDECalibration(bandwidth=0.05, n_key=32, region="all")
    torch.testing.assert_close(
        calib(probs, labels, _gen(0)), kde_calibrate(probs, labels, 0.05, 32, region="all", generator=_gen(0))
    )
    assert repr(calib) == (
        "KDECalibration(bandwidth=0.05, n_key=32, region='all', boundary_width=1, importance_weights=True, "
        "key_sampling='balanced', key_scope='batch')"
    )
    small = KDECalibration(n_key=2)
    small.check_num_classes(2)
    with pytest.raises(ValueError, match="n_key must be at least the number of classes"):
        small.check_num_classes(3)
    with pytest.raises(ValueError, match="n_key must be at least the number of classes"):
        small(probs, labels)


def test_from_config() -> None:
    assert KDECalibration.from_config(None) is None
    assert KDECalibration.from_config(False) is None
    assert KDECalibration.from_config(True) == KDECalibration()
    calib = KDECalibration.from_config({"bandwidth": 0.01, "region": "all"})
    assert (calib.bandwidth, calib.region, calib.n_key) == (0.01, "all", 1024)
    with pytest.raises(ValueError, match=r"unknown KDE calibration option 'bw'.*bandwidth.*n_key"):
        KDECalibration.from_config({"bw": 0.01})
    with pytest.raises(ValueError, match="bandwidth"):
        KDECalibration.from_config({"bandwidth": 0})
    with pytest.raises(ValueError, match="write 1.0e-3"):
        KDECalibration.from_config({"bandwidth": "1e-3"})  # what PyYAML makes of `bandwidth: 1e-3`
    with pytest.raises(TypeError, match="must be None, a bool or a dict"):
        KDECalibration.from_config("yes")


# ----------------------------------------------------------------------------- benchmark


def test_benchmark_runs_quickly() -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/kde.py", "--quick", "--repeats", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "time ratio for 2x pixels: key points" in result.stdout
    assert "full batch" in result.stdout

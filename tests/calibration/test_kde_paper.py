"""The KDE of Wang et al.'s reference code (key points from each image, unweighted, hard key
labels; ``key_scope="image"``, ``importance_weights=False``) and the key-point readings around it,
against python loops of eq. 30-31 (Beta kernel) and the paper's ceil(n_key / n_unique) rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from probseg.calibration import KDECalibration, kde_calibrate, sample_key_points


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def log_beta_kernel(p: float, centre: float, h: float) -> float:
    """log k_Beta(p; alpha, beta) of eq. 31, alpha = centre / h + 1, beta = (1 - centre) / h + 1."""
    a, b = centre / h + 1, (1 - centre) / h + 1
    p = min(max(p, 1e-300), 1 - 1e-16)
    return math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + (a - 1) * math.log(p) + (b - 1) * math.log1p(-p)


def ref_image_kde(fg: np.ndarray, labels: np.ndarray, h: float) -> np.ndarray:
    """One image's recalibrated foreground map, every pixel a key point (eq. 30, unweighted, hard
    labels), replacing only misclassified pixels and pixels with another label in their 3x3 window."""
    rows, cols = fg.shape
    keys = [(float(fg[i, j]), int(labels[i, j])) for i in range(rows) for j in range(cols)]
    out = fg.astype(float).copy()
    for i in range(rows):
        for j in range(cols):
            window = labels[max(i - 1, 0):i + 2, max(j - 1, 0):j + 2]
            misclassified = int(fg[i, j] > 0.5) != labels[i, j]
            if not (misclassified or (window != labels[i, j]).any()):
                continue
            logs = [log_beta_kernel(float(fg[i, j]), c, h) for c, _ in keys]
            top = max(logs)
            kernel = [math.exp(v - top) for v in logs]
            out[i, j] = sum(k * y for k, (_, y) in zip(kernel, keys, strict=True)) / sum(kernel)
    return out


def test_reference_kde_per_image_with_hard_labels() -> None:
    """n_key larger than an image: every pixel of the image is a key point, so the estimate is
    deterministic; each image is calibrated from its own pixels only."""
    g = _gen(3)
    fg = torch.rand(2, 6, 7, generator=g, dtype=torch.float64) * 0.9 + 0.05
    labels = (torch.rand(2, 6, 7, generator=g, dtype=torch.float64) < fg).long()
    labels[1] = (fg[1] > 0.4).long()  # image 1: a different relation between f and y
    probs = torch.stack([1 - fg, fg], 1)
    h = 0.05
    got = kde_calibrate(probs, labels, h, 1000, importance_weights=False, key_scope="image", generator=_gen(0))
    for b in range(2):
        want = ref_image_kde(fg[b].numpy(), labels[b].numpy(), h)
        np.testing.assert_allclose(got[b, 1].numpy(), want, rtol=1e-9, atol=1e-12)
    pooled = kde_calibrate(probs, labels, h, 1000, importance_weights=False, generator=_gen(0))
    assert (pooled - got).abs().max() > 1e-3  # the batch's key points give another estimate


def _calibrated_constant(rates: list[float], size: int = 40,
                         f: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose labels are foreground on exactly ``rate`` of the pixels and whose network says
    f = rate everywhere (a perfectly calibrated network, E[y | f] = rate), or f = ``f``."""
    fg, labels = [], []
    for rate in rates:
        n = size * size
        y = torch.zeros(n, dtype=torch.long)
        y[: round(rate * n)] = 1
        labels.append(y[torch.randperm(n, generator=_gen(len(labels)))].view(size, size))
        fg.append(torch.full((size, size), rate if f is None else f, dtype=torch.float64))
    fg_t = torch.stack(fg)
    return torch.stack([1 - fg_t, fg_t], 1), torch.stack(labels)


@pytest.mark.parametrize("n_key", [64, 256])
def test_unweighted_balanced_key_points_estimate_their_own_class_shares(n_key: int) -> None:
    """Every pixel has the same f, so every kernel value is equal and the estimate is the share
    of foreground among the key points: ceil(n_key / 2) of each class -> 0.5 for a calibrated
    5 % foreground (the paper's estimator), n_1 / n with the importance weights (the truth)."""
    probs, labels = _calibrated_constant([0.05, 0.2])
    n = labels[0].numel()
    counts = [[int((labels[b] == c).sum()) for c in (0, 1)] for b in range(2)]
    per_class = math.ceil(n_key / 2)
    for b in range(2):
        m = [min(c, per_class) for c in counts[b]]
        unweighted = kde_calibrate(probs, labels, 1e-3, n_key, region="all", importance_weights=False,
                                   key_scope="image", generator=_gen(1))
        assert float(unweighted[b, 1].mean()) == pytest.approx(m[1] / sum(m), abs=1e-9)
        weighted = kde_calibrate(probs, labels, 1e-3, n_key, region="all", key_scope="image", generator=_gen(1))
        assert float(weighted[b, 1].mean()) == pytest.approx(counts[b][1] / n, abs=1e-9)


def test_key_scope_image_calibrates_each_image_from_its_own_pixels() -> None:
    """Two images with f = 0.1 everywhere, 5 % and 20 % foreground: weighted key points from each
    image give each image its own share; key points from the batch give both the pooled 12.5 %."""
    probs, labels = _calibrated_constant([0.05, 0.2], f=0.1)
    share = [float((labels[b] == 1).double().mean()) for b in range(2)]
    per_image = kde_calibrate(probs, labels, 1e-3, 64, region="all", key_scope="image", generator=_gen(1))
    for b in range(2):
        assert float(per_image[b, 1].mean()) == pytest.approx(share[b], abs=1e-9)
    batch = kde_calibrate(probs, labels, 1e-3, 64, region="all", generator=_gen(1))
    assert float(batch[:, 1].mean()) == pytest.approx(sum(share) / 2, abs=1e-9)


def test_proportional_key_points_need_no_weights() -> None:
    """key_sampling="proportional" (the reference code's biased=True): ceil(n_key * n_c / n) key
    points per class, so the unweighted estimate is the class share up to the rounding."""
    probs, labels = _calibrated_constant([0.05])
    n, n_key = labels.numel(), 200
    m = [math.ceil(n_key * int((labels == c).sum()) / n) for c in (0, 1)]
    idx, weights = sample_key_points(labels.view(-1), n_key, _gen(0), key_sampling="proportional")
    assert sorted(torch.bincount(labels.view(-1)[idx]).tolist()) == sorted(m)
    want = [torch.full((m[c],), int((labels == c).sum()) / m[c]) for c in (0, 1)]
    torch.testing.assert_close(weights, torch.cat(want))
    out = kde_calibrate(probs, labels, 1e-3, n_key, region="all", importance_weights=False,
                        key_sampling="proportional", generator=_gen(0))
    assert float(out[:, 1].mean()) == pytest.approx(m[1] / sum(m), abs=1e-9)
    assert abs(m[1] / sum(m) - 0.05) < 0.005


def test_options_are_checked_and_configurable() -> None:
    probs, labels = _calibrated_constant([0.1], size=8)
    for bad in ({"key_scope": "pixel"}, {"key_sampling": "uniform"}):
        with pytest.raises(ValueError, match="must be one of"):
            kde_calibrate(probs, labels, **bad)
        with pytest.raises(ValueError, match="must be one of"):
            KDECalibration(**bad)
    calib = KDECalibration.from_config({"importance_weights": False, "key_scope": "image", "n_key": 16})
    torch.testing.assert_close(calib(probs, labels, _gen(2)), kde_calibrate(
        probs, labels, n_key=16, importance_weights=False, key_scope="image", generator=_gen(2)))

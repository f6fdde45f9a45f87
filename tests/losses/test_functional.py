"""Pixel-wise cross-entropy against a brute-force per-pixel -log softmax."""

from __future__ import annotations

import math

import pytest
import torch

from probseg.losses import cross_entropy, reduce_batch

B, K, H, W = 3, 4, 5, 6


def brute_force_per_pixel(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, H, W) of -sum_k t_k log softmax(logits)_k, one pixel at a time in plain Python."""
    b, k, h, w = logits.shape
    out = torch.zeros(b, h, w, dtype=torch.float64)
    for i in range(b):
        for r in range(h):
            for c in range(w):
                scores = [float(logits[i, j, r, c]) for j in range(k)]
                log_z = math.log(sum(math.exp(s) for s in scores))
                if target.ndim == 3:
                    out[i, r, c] = log_z - scores[int(target[i, r, c])]
                else:
                    out[i, r, c] = sum(float(target[i, j, r, c]) * (log_z - scores[j]) for j in range(k))
    return out


def reduce_ref(per_pixel: torch.Tensor, reduction: str, pixel_reduction: str) -> torch.Tensor:
    per_image = per_pixel.flatten(1).sum(1)
    if pixel_reduction == "mean":
        per_image = per_image / per_pixel[0].numel()
    return {"none": per_image, "mean": per_image.sum() / per_image.numel(), "sum": per_image.sum()}[reduction]


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(B, K, H, W) * 2, torch.randint(K, (B, H, W))


def _one_hot(ids: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.zeros(ids.shape[0], k, *ids.shape[1:])
    for j in range(k):
        out[:, j] = (ids == j).float()
    return out


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("pixel_reduction", ["sum", "mean"])
def test_cross_entropy_ids_matches_brute_force(data, reduction: str, pixel_reduction: str) -> None:
    logits, ids = data
    expected = reduce_ref(brute_force_per_pixel(logits, ids), reduction, pixel_reduction)
    got = cross_entropy(logits, ids, reduction=reduction, pixel_reduction=pixel_reduction)
    assert got.shape == ((B,) if reduction == "none" else ())
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("pixel_reduction", ["sum", "mean"])
def test_cross_entropy_ids_and_one_hot_probabilities_agree(data, reduction: str, pixel_reduction: str) -> None:
    logits, ids = data
    a = cross_entropy(logits, ids, reduction=reduction, pixel_reduction=pixel_reduction)
    b = cross_entropy(logits, _one_hot(ids, K), reduction=reduction, pixel_reduction=pixel_reduction)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cross_entropy_soft_labels_matches_brute_force(data) -> None:
    logits, _ = data
    soft = torch.rand(B, K, H, W)
    soft = soft / soft.sum(1, keepdim=True)
    expected = reduce_ref(brute_force_per_pixel(logits, soft), "none", "sum")
    torch.testing.assert_close(cross_entropy(logits, soft, reduction="none").double(), expected, rtol=1e-5, atol=1e-5)


def test_cross_entropy_default_is_pixel_sum_batch_mean(data) -> None:
    logits, ids = data
    expected = brute_force_per_pixel(logits, ids).sum() / B
    torch.testing.assert_close(cross_entropy(logits, ids).double(), expected, rtol=1e-5, atol=1e-5)


def test_cross_entropy_accepts_integer_valued_float_ids(data) -> None:
    logits, ids = data
    torch.testing.assert_close(cross_entropy(logits, ids.float()), cross_entropy(logits, ids))


def test_cross_entropy_gradient_is_softmax_minus_target(data) -> None:
    """d/dlogits of the per-pixel CE summed over pixels and batch is softmax - one_hot."""
    logits, ids = data
    logits = logits.double().requires_grad_()
    cross_entropy(logits, ids, reduction="sum", pixel_reduction="sum").backward()
    e = logits.detach().exp()
    expected = e / e.sum(1, keepdim=True) - _one_hot(ids, K).double()
    torch.testing.assert_close(logits.grad, expected)


def test_cross_entropy_of_confident_correct_logits_is_near_zero() -> None:
    ids = torch.randint(2, (2, 4, 4))
    logits = _one_hot(ids, 2) * 50.0
    assert cross_entropy(logits, ids, reduction="sum") < 1e-10
    # and the uniform prediction costs log K per pixel
    torch.testing.assert_close(
        cross_entropy(torch.zeros(2, 2, 4, 4), ids, reduction="none"), torch.full((2,), 16 * math.log(2))
    )


@pytest.mark.parametrize(
    ("logits_shape", "target_shape"),
    [
        ((B, K, H), (B, H)),  # 3D logits
        ((B, K, H, W), (B, H, W + 1)),  # ids of the wrong size
        ((B, K, H, W), (B + 1, H, W)),  # ids with the wrong batch
        ((B, K, H, W), (B, K + 1, H, W)),  # probabilities with the wrong classes
        ((B, K, H, W), (B, 1, H, W)),
        ((B, K, H, W), (H, W)),
    ],
)
def test_cross_entropy_bad_shapes_are_value_errors(logits_shape, target_shape) -> None:
    target = torch.zeros(target_shape, dtype=torch.long if len(target_shape) <= 3 else torch.float32)
    with pytest.raises(ValueError, match="expected"):
        cross_entropy(torch.randn(logits_shape), target)


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"reduction": "avg"}, "reduction"), ({"pixel_reduction": "max"}, "pixel_reduction")]
)
def test_cross_entropy_bad_reduction_names(data, kwargs: dict, match: str) -> None:
    logits, ids = data
    with pytest.raises(ValueError, match=match):
        cross_entropy(logits, ids, **kwargs)


def test_reduce_batch() -> None:
    v = torch.tensor([1.0, 2.0, 6.0])
    assert reduce_batch(v, "none") is v
    assert reduce_batch(v, "mean").item() == 3.0
    assert reduce_batch(v, "sum").item() == 9.0
    with pytest.raises(ValueError, match="none"):
        reduce_batch(v, "median")


def test_fractional_float_ids_are_refused_not_truncated() -> None:
    logits = torch.zeros(1, 2, 4, 4)
    with pytest.raises(TypeError, match=r"\(B, K, H, W\) probabilities"):
        cross_entropy(logits, torch.full((1, 4, 4), 0.7))
    # integer-valued floats are class ids
    torch.testing.assert_close(cross_entropy(logits, torch.ones(1, 4, 4)), cross_entropy(logits, torch.ones(1, 4, 4, dtype=torch.long)))

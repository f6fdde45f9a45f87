"""ReconstructionLoss: weighted components checked against hand formulas (CE as
-(t * log_softmax).sum over classes, DML1 from eq. 4 in numpy, F.cross_entropy with class ids)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from probseg.losses import COMPONENTS, ReconstructionLoss, cftl

B, K, H, W = 2, 3, 4, 5


def data(seed: int = 0, hard: bool = False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, K, H, W, generator=g, dtype=torch.float64) * 2
    if hard:
        ids = torch.randint(K, (B, H, W), generator=g)
        return logits, F.one_hot(ids, K).movedim(-1, 1).double(), ids
    target = torch.rand(B, K, H, W, generator=g, dtype=torch.float64)
    return logits, target / target.sum(1, keepdim=True), None


def ce_per_pixel(logits, target) -> torch.Tensor:
    """(B, H, W) soft cross-entropy -sum_c t_c log softmax(logits)_c."""
    return -(target * F.log_softmax(logits, dim=1)).sum(1)


def np_dml1(probs, target, smooth: float = 1.0) -> float:
    """Batch mean of the per-image class mean of 1 - (|p+t| - |p-t| + s) / (|p+t| + s) (eq. 4)."""
    p, t = probs.detach().numpy(), target.numpy()
    per_image = []
    for b in range(p.shape[0]):
        per_class = []
        for k in range(p.shape[1]):
            plus, minus = np.abs(p[b, k] + t[b, k]).sum(), np.abs(p[b, k] - t[b, k]).sum()
            per_class.append(1 - (plus - minus + smooth) / (plus + smooth))
        per_image.append(np.mean(per_class))
    return float(np.mean(per_image))


def close(a, b, tol=1e-6) -> None:
    np.testing.assert_allclose(float(a), float(b), rtol=tol, atol=tol)


def test_paper_mix_sum_scale() -> None:
    """{"ce": 0.25, "dml1": 0.75}, pixel sum: 0.25 * CE summed over pixels (batch mean) and
    0.75 * H*W * DML1(softmax, target)."""
    logits, target, _ = data(1)
    terms = ReconstructionLoss({"ce": 0.25, "dml1": 0.75})(logits, target)
    assert set(terms) == {"rec_ce", "rec_dml1"}
    close(terms["rec_ce"], 0.25 * ce_per_pixel(logits, target).sum((1, 2)).mean())
    close(terms["rec_dml1"], 0.75 * H * W * np_dml1(logits.softmax(1), target))


def test_paper_mix_mean_scale() -> None:
    """pixel_reduction="mean": CE is the pixel mean, DML1 unscaled."""
    logits, target, _ = data(2)
    terms = ReconstructionLoss({"ce": 0.25, "dml1": 0.75}, pixel_reduction="mean")(logits, target)
    close(terms["rec_ce"], 0.25 * ce_per_pixel(logits, target).mean())
    close(terms["rec_dml1"], 0.75 * np_dml1(logits.softmax(1), target))


def test_region_options_are_passed_on() -> None:
    """smooth=0 reaches the region loss: numpy DML1 with s = 0."""
    logits, target, _ = data(3)
    terms = ReconstructionLoss({"dml1": 1.0}, pixel_reduction="mean", smooth=0.0)(logits, target)
    close(terms["rec_dml1"], np_dml1(logits.softmax(1), target, smooth=0.0))


def test_uniform_kl_and_mse_components() -> None:
    """uniform_kl = H*W * mean of -mean_c log softmax; mse = H*W * mean of sum_c (p - t)^2."""
    logits, target, _ = data(4)
    terms = ReconstructionLoss({"uniform_kl": 2.0, "mse": 0.5})(logits, target)
    p = logits.softmax(1)
    close(terms["rec_uniform_kl"], 2.0 * H * W * (-p.log().mean(1)).mean())
    close(terms["rec_mse"], 0.5 * H * W * ((p - target) ** 2).sum(1).mean())


def test_hard_targets_ce_equals_cross_entropy_with_class_ids() -> None:
    """One-hot targets, "ce" only: F.cross_entropy(logits, ids) summed over pixels, batch mean."""
    logits, target, ids = data(5, hard=True)
    terms = ReconstructionLoss({"ce": 1.0})(logits, target)
    assert set(terms) == {"rec_ce"}
    close(terms["rec_ce"], F.cross_entropy(logits, ids, reduction="none").sum((1, 2)).mean())
    close(ReconstructionLoss()(logits, target)["rec_ce"], terms["rec_ce"])  # the default is {"ce": 1}


@pytest.mark.parametrize("name", COMPONENTS)
def test_gradients_flow_to_logits(name: str) -> None:
    logits, target, _ = data(6)
    logits = logits.float().requires_grad_()
    terms = ReconstructionLoss({name: 1.0})(logits, target.float())
    (value,) = terms.values()
    value.backward()
    assert logits.grad is not None
    assert bool(torch.isfinite(logits.grad).all())
    assert float(logits.grad.abs().sum()) > 0


def test_cftl_component_matches_public_cftl() -> None:
    """{"cftl": 1}, pixel mean == cftl(softmax(logits), target) with cftl's own defaults."""
    logits, target, _ = data(7)
    terms = ReconstructionLoss({"cftl": 1.0, "ctl": 1.0}, pixel_reduction="mean", alpha=0.7, beta=0.3)(logits, target)
    close(terms["rec_cftl"], cftl(logits.softmax(1), target, alpha=0.7, beta=0.3))
    assert float(terms["rec_cftl"]) != pytest.approx(float(terms["rec_ctl"]))


@pytest.mark.parametrize("kwargs,match", [
    ({"weights": {"dice": 1.0}}, "unknown reconstruction components"),
    ({"weights": {"ce": -0.5, "dml1": 1.0}}, "non-negative"),
    ({"weights": {"ce": 0.0, "dml1": 0.0}}, "non-negative with one positive"),
    ({"weights": {"dml1": 1.0}, "smoothing": 1.0}, "unknown loss options"),
    ({"weights": {"dml1": 1.0}, "classes": "some"}, "classes must be one of"),
    ({"weights": {"dml1": 1.0}, "smooth": -1.0}, "smooth >= 0"),
    ({"weights": {"ctl": 1.0}, "alpha": -1.0}, "alpha >= 0"),
    ({"weights": {"ce": 1.0}, "pixel_reduction": "max"}, "pixel_reduction"),
])
def test_bad_configuration_raises_at_construction(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        ReconstructionLoss(**kwargs)


def test_target_shape_mismatch_raises() -> None:
    logits, target, _ = data(8)
    loss = ReconstructionLoss({"ce": 0.25, "dml1": 0.75})
    for bad in (target[:, :2], target[..., :3], target[:, 0, :3]):
        with pytest.raises(ValueError, match=r"target .* logits"):
            loss(logits, bad)


def test_class_id_targets_equal_one_hot_hand_formulas() -> None:
    """(B, H, W) class ids: CE == F.cross_entropy with the ids (pixel sum, batch mean), DML1 ==
    numpy eq. 4 on the one-hot maps, scaled by H*W."""
    logits, onehot, ids = data(9, hard=True)
    terms = ReconstructionLoss({"ce": 0.25, "dml1": 0.75})(logits, ids)
    close(terms["rec_ce"], 0.25 * F.cross_entropy(logits, ids, reduction="none").sum((1, 2)).mean())
    close(terms["rec_dml1"], 0.75 * H * W * np_dml1(logits.softmax(1), onehot))

"""The region-loss reductions of Wang et al.'s reference code (``recipe="paper"``) against python
loops written from the Tversky form of the paper's losses: cardinalities pooled over the batch,
"present" classes for hard labels and all classes for soft ones, s added to the Tversky index,
pixel-mean cross-entropy, 0.25 CE + 0.75 DML1."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from probseg.losses import ReconstructionLoss, region_loss


def ref_tversky_loss(x: np.ndarray, y: np.ndarray, hard: bool, alpha: float = 0.5, beta: float = 0.5,
                     s: float = 1.0, gamma: float = 1.0) -> float:
    """Batch-pooled loss of (B, K, H, W) maps, one pixel at a time: per class, tp = sum min(x, y)
    (= (|x + y| - |x - y|) / 2), fp = |x| - tp, fn = |y| - tp over every pixel of every image;
    loss_c = (1 - (tp + s) / (tp + alpha fp + beta fn + s)) ** gamma, averaged over the classes
    that occur in the batch (hard labels) or over all classes (soft labels); 0 when none occur."""
    b, k, h, w = x.shape
    losses = []
    for c in range(k):
        tp = fp = fn = 0.0
        seen = False
        for i in range(b):
            for r in range(h):
                for q in range(w):
                    xv, yv = float(x[i, c, r, q]), float(y[i, c, r, q])
                    inter = ((xv + yv) - abs(xv - yv)) / 2
                    tp, fp, fn = tp + inter, fp + xv - inter, fn + yv - inter
                    seen = seen or yv > 0.5
        if seen or not hard:
            losses.append((1 - (tp + s) / (tp + alpha * fp + beta * fn + s)) ** gamma)
    return sum(losses) / len(losses) if losses else 0.0


def ref_pixel_mean_ce(logits: np.ndarray, y: np.ndarray) -> float:
    """-sum_c y_c log softmax(logits)_c, averaged over every pixel of every image."""
    b, k, h, w = logits.shape
    total = 0.0
    for i in range(b):
        for r in range(h):
            for q in range(w):
                z = logits[i, :, r, q].astype(float)
                log_norm = math.log(sum(math.exp(v - z.max()) for v in z)) + z.max()
                total -= sum(float(y[i, c, r, q]) * (z[c] - log_norm) for c in range(k))
    return total / (b * h * w)


def _case(seed: int, k: int = 3, b: int = 3, size: int = 5, absent: int | None = 2):
    """Logits, class ids (class ``absent`` nowhere in the batch) and a soft target."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, k, size, size, generator=g, dtype=torch.float64)
    ids = torch.randint(0, k - (absent is not None), (b, size, size), generator=g)
    soft = torch.rand(b, k, size, size, generator=g, dtype=torch.float64)
    return logits, ids, soft / soft.sum(1, keepdim=True)


def _onehot(ids: torch.Tensor, k: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(ids, k).permute(0, 3, 1, 2).double()


@pytest.mark.parametrize("seed", range(3))
def test_pooled_present_classes_tversky_smoothing_hard_labels(seed: int) -> None:
    """DML1 on hard labels, class 2 absent from the batch: the reference averages classes 0 and 1."""
    logits, ids, _ = _case(seed)
    p, y = logits.softmax(1), _onehot(ids, 3)
    got = region_loss(p, y, "dml1", per_image=False, classes="present", smooth_form="tversky")
    assert float(got) == pytest.approx(ref_tversky_loss(p.numpy(), y.numpy(), hard=True), rel=1e-12, abs=1e-14)
    # the same with probseg's smoothing scale needs smooth = 2 (reference s = 1)
    assert float(region_loss(p, y, "dml1", per_image=False, classes="present", smooth=2.0)) == pytest.approx(float(got))


@pytest.mark.parametrize(("kind", "options"), [
    ("dml1", {}), ("dml2", {}), ("sdl", {}), ("jml1", {"alpha": 1.0, "beta": 1.0}), ("ctl", {"alpha": 0.7, "beta": 0.3}),
    ("cftl", {"alpha": 0.7, "beta": 0.3, "gamma": 2.0}),
])
def test_tversky_form_smoothing_on_soft_labels(kind: str, options: dict) -> None:
    """Soft labels, all classes, batch-pooled: every kind against the Tversky-form loop (on soft
    labels DML1 / DML2 / SDL differ, but only DML1 is the reference's; sdl and dml2 are checked
    on hard labels, where all three agree)."""
    logits, ids, soft = _case(5, absent=None)
    p = logits.softmax(1)
    hard = kind in ("sdl", "dml2")
    y = _onehot(ids, 3) if hard else soft
    ref_kw = {k: v for k, v in options.items() if k in ("alpha", "beta", "gamma")}
    for s in (1.0, 0.3):
        got = region_loss(p, y, kind, smooth=s, per_image=False, smooth_form="tversky", **options)
        want = ref_tversky_loss(p.numpy(), y.numpy(), hard=False, s=s, **ref_kw)
        assert float(got) == pytest.approx(want, rel=1e-12, abs=1e-14), (kind, s)


def test_pooled_loss_has_no_per_image_value() -> None:
    logits, ids, _ = _case(0)
    with pytest.raises(ValueError, match="no per-image loss"):
        region_loss(logits.softmax(1), _onehot(ids, 3), "dml1", per_image=False, reduction="none")
    with pytest.raises(ValueError, match="smooth_form"):
        region_loss(logits.softmax(1), _onehot(ids, 3), "dml1", smooth_form="dice")


def test_no_present_class_costs_zero() -> None:
    """A target without any class (an all-zero map) has no present class: 0, as in the reference."""
    p = torch.full((2, 2, 3, 3), 0.5, dtype=torch.float64)
    y = torch.zeros_like(p)
    assert float(region_loss(p, y, "dml1", per_image=False, classes="present", smooth_form="tversky")) == 0.0
    assert ref_tversky_loss(p.numpy(), y.numpy(), hard=True) == 0.0


@pytest.mark.parametrize("seed", range(2))
def test_paper_recipe_mix_on_hard_and_soft_targets(seed: int) -> None:
    """ReconstructionLoss(recipe="paper"): 0.25 pixel-mean CE + 0.75 batch-pooled DML1 in the
    Tversky form, present classes for class ids, all classes for probability maps."""
    logits, ids, soft = _case(seed)
    loss = ReconstructionLoss({"ce": 0.25, "dml1": 0.75}, recipe="paper")
    p = logits.softmax(1).numpy()
    for target, hard, y in ((ids, True, _onehot(ids, 3)), (soft, False, soft)):
        terms = loss(logits, target)
        assert float(terms["rec_ce"]) == pytest.approx(0.25 * ref_pixel_mean_ce(logits.numpy(), y.numpy()), rel=1e-10)
        want = 0.75 * ref_tversky_loss(p, y.numpy(), hard=hard)
        assert float(terms["rec_dml1"]) == pytest.approx(want, rel=1e-10), hard
    # the one-hot map of the same hard labels is a soft target: all classes, as in the reference
    onehot = loss(logits, _onehot(ids, 3))["rec_dml1"]
    assert float(onehot) == pytest.approx(0.75 * ref_tversky_loss(p, _onehot(ids, 3).numpy(), hard=False), rel=1e-10)


def test_recipe_defaults_and_explicit_options() -> None:
    paper = ReconstructionLoss({"dml1": 1.0}, recipe="paper")
    assert paper.pixel_reduction == "mean" and paper.region_options == {}
    assert paper._region_options(hard=True) == {"per_image": False, "classes": "present", "smooth_form": "tversky"}
    assert paper._region_options(hard=False)["classes"] == "all"
    mixed = ReconstructionLoss({"dml1": 1.0}, pixel_reduction="sum", recipe="paper", per_image=True)
    assert mixed.pixel_reduction == "sum" and mixed._region_options(hard=True)["per_image"] is True
    probseg = ReconstructionLoss({"dml1": 1.0})
    assert probseg.pixel_reduction == "sum" and probseg._region_options(hard=True)["classes"] == "all"
    with pytest.raises(ValueError, match="recipe must be one of"):
        ReconstructionLoss({"dml1": 1.0}, recipe="wang")


def test_resolved_region_options_are_the_ones_applied() -> None:
    """``region_options`` holds what was given; ``resolved_region_options`` what the losses use."""
    paper = ReconstructionLoss({"dml1": 1.0}, recipe="paper", smooth=2.0)
    assert paper.region_options == {"smooth": 2.0}
    assert paper.resolved_region_options == {"per_image": False, "classes": "auto", "smooth_form": "tversky",
                                             "smooth": 2.0}
    paper.resolved_region_options["per_image"] = True  # a copy: the loss is unchanged
    assert paper._region_options(hard=True) == {"per_image": False, "classes": "present", "smooth_form": "tversky",
                                                "smooth": 2.0}
    mixed = ReconstructionLoss({"dml1": 1.0}, recipe="paper", per_image=True, classes="all")
    assert mixed.resolved_region_options == {"per_image": True, "classes": "all", "smooth_form": "tversky"}
    assert ReconstructionLoss({"dml1": 1.0}).resolved_region_options == {
        "per_image": True, "classes": "all", "smooth_form": "loss"}

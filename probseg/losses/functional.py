"""Loss functions on tensors. Reductions follow the library convention: ``reduction="none"``
returns one value per image, shape (B,); "mean" and "sum" reduce over the batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_REDUCTIONS = ("none", "mean", "sum")


def reduce_batch(values: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce per-image values (B,) by ``reduction`` ("none" | "mean" | "sum")."""
    if reduction == "none":
        return values
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    reduction: str = "mean",
    pixel_reduction: str = "sum",
) -> torch.Tensor:
    """Pixel-wise cross-entropy of a segmentation, per image.

    Kohl et al. (2018) sum the cross-entropy over pixels and average over the batch, which is the
    default here (``pixel_reduction="sum"``, ``reduction="mean"``): with that scale a KL weight
    beta = 1 matches their ELBO.

    Args:
        logits: (B, K, H, W) unnormalized scores.
        target: (B, H, W) integer class ids, or (B, K, H, W) class probabilities (soft labels).
        reduction: over the batch: "none" (B,), "mean" or "sum".
        pixel_reduction: over pixels: "sum" or "mean".

    Returns:
        (B,) for ``reduction="none"``, else a scalar.
    """
    if logits.ndim != 4:
        raise ValueError(f"expected logits of shape (B, K, H, W), got {tuple(logits.shape)}")
    if target.shape not in (logits.shape[:1] + logits.shape[2:], logits.shape):
        raise ValueError(
            f"target of shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}: "
            "expected (B, H, W) class ids or (B, K, H, W) probabilities"
        )
    if target.ndim == 3:
        if target.is_floating_point() and not bool((target == target.round()).all()):
            raise TypeError(
                "a (B, H, W) target must hold class ids; give soft labels as (B, K, H, W) probabilities"
            )
        target = target.long()
    else:
        target = target.to(logits.dtype)
    return _pixel_reduce(F.cross_entropy(logits, target, reduction="none"), pixel_reduction, reduction)


# --- losses on probabilities: soft labels ------------------------------------------------------

REGION_LOSSES = ("sdl", "sjl", "jml1", "jml2", "dml1", "dml2", "ctl", "cftl")
"""Region (overlap) losses of :func:`region_loss`."""

CLASS_SELECTIONS = ("all", "present")

SMOOTH_FORMS = ("loss", "tversky")
"""Where :func:`region_loss` adds ``smooth``: to the N and D of the loss's own form, or to the
Tversky index tp / (tp + alpha fp + beta fn) (the reference code's)."""

_DICE_SCALE = ("sdl", "dml1", "dml2")
"""Kinds whose N and D are twice the Tversky index's (Dice scale: 2 tp / (2 tp + fp + fn))."""


def check_probability_maps(pred: torch.Tensor, target: torch.Tensor | None = None) -> None:
    """``pred`` (and ``target``) must be (B, K, H, W) floating maps with values in [0, 1]."""
    from probseg._ops import check_probabilities

    for name, x in (("pred", pred), ("target", target)):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ValueError(f"{name} must be (B, K, H, W) probabilities, got {tuple(getattr(x, 'shape', ()))}")
        check_probabilities(x, name)
    if target is not None and target.shape != pred.shape:
        same_rest = target.shape[:1] + target.shape[2:] == pred.shape[:1] + pred.shape[2:]
        what = "classes K" if same_rest else "shape"
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in {what}")


def _overlap_counts(pred: torch.Tensor, target: torch.Tensor, per_image: bool) -> dict[str, torch.Tensor]:
    """L1 cardinalities per class: |x|, |y|, <x, y> and |x - y|, each (B, K), or (1, K) pooled."""
    x, y = pred.flatten(2), target.flatten(2)
    counts = {"x": x.sum(-1), "y": y.sum(-1), "xy": (x * y).sum(-1), "diff": (x - y).abs().sum(-1)}
    if not per_image:
        counts = {k: v.sum(0, keepdim=True) for k, v in counts.items()}
    return counts


def region_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    kind: str = "dml1",
    *,
    alpha: float = 0.5,
    beta: float = 0.5,
    gamma: float | None = None,
    smooth: float = 1.0,
    classes: str = "all",
    per_image: bool = True,
    reduction: str = "mean",
    check: bool = True,
    smooth_form: str = "loss",
) -> torch.Tensor:
    """Overlap losses of the soft Dice / Jaccard / Tversky families (Wang et al., "Dice Semimetric
    Losses", eqs. 1-4 and Appendix D).

    With the L1 cardinalities of each class over the pixels, |x|, |y|, <x, y> and |x - y| (x the
    predicted and y the target probabilities), each loss is 1 - (N + s) / (D + s) with s =
    ``smooth`` and:

    ======  ==========================================  ===========================================
    kind    N                                           D
    ======  ==========================================  ===========================================
    sdl     2 <x, y>                                    |x| + |y|
    sjl     <x, y>                                      |x| + |y| - <x, y>
    jml1    (|x| + |y| - |x - y|) / 2                   (|x| + |y| + |x - y|) / 2
    jml2    <x, y>                                      <x, y> + |x - y|
    dml1    |x| + |y| - |x - y|                         |x| + |y|
    dml2    2 <x, y>                                    2 <x, y> + |x - y|
    ctl     (|x| + |y| - |x - y|) / 2                   alpha |x| + beta |y| + (1 - alpha - beta) N
    cftl    as ctl, raised to gamma (default 4/3)
    ======  ==========================================  ===========================================

    (|x + y| = |x| + |y| for non-negative maps.) Each N and D has the scale of the loss it extends
    on hard labels (SJL for JML, SDL for DML, the soft Tversky loss for CTL), so the equalities of
    Theorems 2 and 6 hold for any ``smooth``. SDL and SJL are only correct for hard labels
    (on a single foreground channel with target 0.5, SDL is minimized by predicting 1); JML, DML and CTL reach 0 exactly at
    x = y for soft labels too, and equal SJL / SDL / the soft Tversky loss on hard labels
    (Theorems 2 and 6). ``gamma`` is a focal exponent for every kind (CFTL is CTL with it).
    A class whose N and D are both 0 (empty in prediction and target, ``smooth=0``) costs 0.

    Smoothing. With ``smooth_form="loss"`` (default) s is added to N and D as tabulated. The
    reference code (JDTLosses) adds it to the Tversky index instead, (tp + s) / (tp + alpha fp +
    beta fn + s) with tp = N of ctl: for the Dice-scale kinds (sdl, dml1, dml2), whose N and D are
    twice the Tversky index's, ``smooth_form="tversky"`` therefore adds 2 s; for the others
    (sjl, jml1, jml2, ctl, cftl) both forms are the same.

    Args:
        pred: (B, K, H, W) predicted class probabilities in [0, 1].
        target: (B, K, H, W) target probabilities in [0, 1] (one-hot for hard labels).
        kind: one of :data:`REGION_LOSSES`.
        alpha, beta: Tversky weights of false positives and false negatives (ctl, cftl);
            alpha = beta = 0.5 is the Dice form, 1 the Jaccard form.
        gamma: focal exponent applied to each class's loss (default 1; 4/3 for cftl).
        smooth: s, added to numerator and denominator.
        classes: "all" averages over the K classes; "present" over the classes with target mass
            in the image (in the batch when pooled).
        per_image: cardinalities per image (default); False pools them over the batch: one loss
            for the batch, returned for "mean" and "sum" alike, and ``reduction="none"`` is refused.
        reduction: over the batch: "none" (B,), "mean" or "sum".
        check: validate shapes and value ranges (callers with known-good inputs skip it).
        smooth_form: ``"loss"`` or ``"tversky"`` (see Smoothing above).

    Returns:
        (B,) for ``reduction="none"``, else a scalar.
    """
    if kind not in REGION_LOSSES:
        raise ValueError(f"unknown region loss {kind!r}; expected one of {REGION_LOSSES}")
    if classes not in CLASS_SELECTIONS:
        raise ValueError(f"classes must be one of {CLASS_SELECTIONS}, got {classes!r}")
    if smooth_form not in SMOOTH_FORMS:
        raise ValueError(f"smooth_form must be one of {SMOOTH_FORMS}, got {smooth_form!r}")
    if gamma is None:
        gamma = 4 / 3 if kind == "cftl" else 1.0
    if smooth < 0 or gamma <= 0 or alpha < 0 or beta < 0:
        raise ValueError(f"need smooth >= 0, gamma > 0, alpha >= 0, beta >= 0; got {smooth}, {gamma}, {alpha}, {beta}")
    if not per_image and reduction == "none":
        raise ValueError("per_image=False pools the cardinalities over the batch: there is no per-image loss "
                         "for reduction='none'")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if check:
        check_probability_maps(pred, target)
    c = _overlap_counts(pred, target, per_image)
    x, y, xy, diff = c["x"], c["y"], c["xy"], c["diff"]
    overlap = x + y - diff  # |x + y| - |x - y| = 2 <x, y> on hard labels
    if kind == "sdl":
        num, den = 2 * xy, x + y
    elif kind == "sjl":
        num, den = xy, x + y - xy
    elif kind == "jml1":
        num, den = overlap / 2, (x + y + diff) / 2
    elif kind == "jml2":
        num, den = xy, xy + diff
    elif kind == "dml1":
        num, den = overlap, x + y
    elif kind == "dml2":
        num, den = 2 * xy, 2 * xy + diff
    else:  # ctl, cftl
        num = overlap / 2
        den = alpha * x + beta * y + (1 - alpha - beta) * num
    if smooth_form == "tversky" and kind in _DICE_SCALE:
        smooth = 2 * smooth
    den = den + smooth
    per_class = torch.where(den > 0, 1 - (num + smooth) / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(den))
    per_class = per_class.clamp_min(0)  # rounding can dip below 0 at x = y
    if gamma != 1.0:
        # x ** gamma with gamma < 1 has an infinite slope at 0: take the power of a floored copy,
        # so a perfectly fitted class has loss 0 and a finite gradient.
        floored = per_class.clamp_min(torch.finfo(per_class.dtype).tiny)
        per_class = torch.where(per_class > 0, floored.pow(gamma), torch.zeros_like(per_class))
    if classes == "all":
        per_image_loss = per_class.mean(dim=1)
    else:
        present = (y > 0).to(per_class.dtype)
        per_image_loss = (per_class * present).sum(1) / present.sum(1).clamp_min(1)
    if not per_image:
        return per_image_loss[0]  # one loss for the batch, for "mean" and "sum" alike
    return reduce_batch(per_image_loss, reduction)


def _region(kind: str):  # one public function per kind, sharing region_loss's options
    def loss(pred: torch.Tensor, target: torch.Tensor, **options) -> torch.Tensor:
        return region_loss(pred, target, kind, **options)

    loss.__name__ = loss.__qualname__ = kind
    loss.__doc__ = f"``region_loss(pred, target, {kind!r}, **options)``; see :func:`region_loss`."
    return loss


sdl, sjl, jml1, jml2, dml1, dml2, ctl, cftl = (_region(k) for k in REGION_LOSSES)




def _pixel_reduce(per_pixel: torch.Tensor, pixel_reduction: str, reduction: str) -> torch.Tensor:
    if pixel_reduction == "sum":
        per_image = per_pixel.flatten(1).sum(1)
    elif pixel_reduction == "mean":
        per_image = per_pixel.flatten(1).mean(1)
    else:
        raise ValueError(f"pixel_reduction must be 'sum' or 'mean', got {pixel_reduction!r}")
    return reduce_batch(per_image, reduction)


def soft_cross_entropy(
    pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean", pixel_reduction: str = "mean",
    eps: float = 1e-7,
) -> torch.Tensor:
    """Per-pixel cross-entropy -sum_c y_c log p_c of probability maps (soft or one-hot targets).

    Args:
        pred: (B, K, H, W) predicted probabilities; clamped to [eps, 1] inside the log.
        target: (B, K, H, W) target probabilities.
        reduction: over the batch. pixel_reduction: over pixels, "mean" or "sum".
        eps: probability floor.

    Returns:
        (B,) for ``reduction="none"``, else a scalar. From logits, :func:`cross_entropy` is the
        numerically stable form.
    """
    check_probability_maps(pred, target)
    per_pixel = -(target * pred.clamp_min(eps).log()).sum(1)
    return _pixel_reduce(per_pixel, pixel_reduction, reduction)


def uniform_kl(pred: torch.Tensor, reduction: str = "mean", pixel_reduction: str = "mean", eps: float = 1e-7) -> torch.Tensor:
    """Per pixel, the mean over classes of -log p_c (the supplement's substitute regularizer).

    .. math:: -\\frac{1}{K} \\sum_c \\log p_c = \\mathrm{KL}(u_{1/K} \\,\\|\\, p) + \\log K

    so it has the gradients of KL(u || p) and pulls predictions towards uniform.

    Args:
        pred: (B, K, H, W) probabilities, clamped to [eps, 1] inside the log.
        reduction, pixel_reduction: as in :func:`soft_cross_entropy`.
    """
    check_probability_maps(pred)
    return _pixel_reduce(-pred.clamp_min(eps).log().mean(1), pixel_reduction, reduction)


def mse(pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean", pixel_reduction: str = "mean") -> torch.Tensor:
    """Per-pixel squared error summed over classes, sum_c (p_c - y_c)^2 (the supplement's eq. 2)."""
    check_probability_maps(pred, target)
    return _pixel_reduce((pred - target).square().sum(1), pixel_reduction, reduction)

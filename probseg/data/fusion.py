"""Rater fusion: how the R rater masks of an image become the training target.

:func:`fuse_raters` turns (B, R, H, W) rater class ids into a (B, K, H, W) target map:

* ``"random"``: one available rater per image per step, one-hot (the PU-Net convention);
* ``"majority"``: the per-pixel majority vote, one-hot (ties to the lower class id);
* ``"mean"``: the uniform average of the raters' one-hot maps (soft labels);
* ``"weighted_mean"``: the average weighted by each rater's Dice against the majority vote
  (Wang et al., "Dice Semimetric Losses", Sec. 3.1), so a rater far from the others counts less;
* ``"label_smoothing"``: the random rater's one-hot map smoothed to (1 - eps) y + eps / K.

Raters absent for an image (``rater_mask`` False) never count. Hard fusions give one-hot maps,
which the cross-entropy treats exactly like class ids.

Recipes. Three details differ between probseg and the Dice semimetric paper's reference code
(JDTLosses); each is an option of :func:`fuse_raters`, and ``recipe`` ("probseg" or "paper") sets
their defaults (:data:`FUSION_RECIPES`):

* ``zero_dice`` (``"weighted_mean"``): the weight of a rater whose Dice against the majority vote
  is 0. probseg: ``"zero"``, the paper's stated intent ("a rater who deviates far from the
  majority votes receives a low weight"). Reference: ``"one"`` (its guard for a non-positive
  Dice), so a rater disjoint from the majority counts fully while one with Dice 0.01 counts 0.01.
  With ``"one"`` an image whose majority vote is empty gets the uniform mean of its raters, as in
  the reference (each rater scores 0, or 1 when empty itself); with ``"zero"`` the raters that are
  empty too get all the weight (an all-background target), or, when there are none, the weights
  fall back to uniform.
* ``smoothing_label`` (``"label_smoothing"``): which hard label is smoothed. probseg:
  ``"random"``, one rater per step (the raters' spread reaches the model, as with ``"random"``).
  Reference: ``"majority"``, the one hard label it has (LiTS / KiTS have one rater; its QUBIQ hard
  label is the majority vote).
* ``smoothing_region`` (``"label_smoothing"``): probseg: ``"all"`` pixels, Szegedy et al.'s label
  smoothing. Reference: ``"boundary"``, only pixels with another class within ``boundary_width``
  pixels (1: the 3 x 3 window), the rest keep their one-hot label.

The reference's eps is 0.5 (its configuration; the paper gives none), set with ``smoothing``;
probseg's default is 0.1.
"""

from __future__ import annotations

from typing import Any

import torch

from probseg._ops import check_rater_mask, foreground_dice, label_boundary, majority_vote, one_hot, resolve_recipe

__all__ = [
    "FUSIONS", "FUSION_RECIPES", "foreground_dice", "fuse_raters", "fusion_options", "majority_vote", "one_hot",
    "random_rater", "rater_weights", "training_target",
]


def random_rater(
    masks: torch.Tensor,
    rater_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    checked: bool = False,
) -> torch.Tensor:
    """Draw one available rater per image, uniformly.

    Randomness comes from ``generator`` or, when None, torch's global RNG (seeded by Lightning's
    ``seed_everything``), so a run is reproducible under its seed.

    Args:
        masks: (B, R, H, W) integer class ids.
        rater_mask: (B, R) bool, True where the rater annotated the image (None: all did).
        generator: optional torch.Generator on ``masks.device``.
        checked: the batch passed :func:`probseg.data.batch.check_batch` (every image has a
            rater): skip that check and its host synchronisation.

    Returns:
        (B, H, W) the chosen rater's mask for each image.
    """
    if masks.ndim != 4:
        raise ValueError(f"expected rater masks of shape (B, R, H, W), got {tuple(masks.shape)}")
    b, r = masks.shape[:2]
    if rater_mask is None:
        index = torch.randint(r, (b,), device=masks.device, generator=generator)
    else:
        if rater_mask.shape != (b, r):
            raise ValueError(f"rater_mask must have shape {(b, r)}, got {tuple(rater_mask.shape)}")
        if not checked and not bool(rater_mask.any(dim=1).all()):
            raise ValueError("every image needs at least one rater (a rater_mask row is all False)")
        index = torch.multinomial(rater_mask.float(), 1, generator=generator).squeeze(1)
    return masks[torch.arange(b, device=masks.device), index]


FUSIONS = ("random", "majority", "mean", "weighted_mean", "label_smoothing")
"""Fusion methods of :func:`fuse_raters`."""

FUSION_RECIPES: dict[str, dict[str, Any]] = {
    "probseg": {"zero_dice": "zero", "smoothing_label": "random", "smoothing_region": "all", "boundary_width": 1},
    "paper": {"zero_dice": "one", "smoothing_label": "majority", "smoothing_region": "boundary", "boundary_width": 1},
}
"""The defaults of :func:`fuse_raters`'s options per ``recipe`` (see the module docstring)."""

_CHOICES = {"zero_dice": ("zero", "one"), "smoothing_label": ("random", "majority"),
            "smoothing_region": ("all", "boundary")}


def fusion_options(recipe: str = "probseg", **options: Any) -> dict[str, Any]:
    """The fusion options of a ``recipe`` with ``options`` (those not None) overriding its defaults.

    Args:
        recipe: a key of :data:`FUSION_RECIPES`.
        **options: ``zero_dice``, ``smoothing_label``, ``smoothing_region``, ``boundary_width``.

    Returns:
        All four options, checked.
    """
    resolved = resolve_recipe(FUSION_RECIPES, recipe, options, _CHOICES, prefix="fusion ")
    width = resolved["boundary_width"]
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"fusion boundary_width must be an integer >= 1, got {width!r}")
    return resolved


def _present(masks: torch.Tensor, rater_mask: torch.Tensor | None, checked: bool) -> torch.Tensor:
    """The (B, R) bool mask of present raters; checked by :func:`check_rater_mask` unless the batch
    already was."""
    if not checked:
        return check_rater_mask(rater_mask, masks)
    return torch.ones(masks.shape[:2], dtype=torch.bool, device=masks.device) if rater_mask is None else rater_mask


def rater_weights(masks: torch.Tensor, rater_mask: torch.Tensor | None, num_classes: int, *,
                  checked: bool = False, zero_dice: str = "zero") -> torch.Tensor:
    """Each rater's Dice against the per-pixel majority vote, normalized over the image's raters.

    Dice is averaged over the foreground classes 1..K-1 (a class empty in both maps scores 1).
    Absent raters get 0. An image whose raters all score 0 falls back to uniform weights.

    Args:
        checked: as in :func:`random_rater`.
        zero_dice: ``"zero"`` (default) keeps a rater's Dice of 0 as its weight; ``"one"`` raises
            it to 1 (the reference code's rule for a non-positive Dice; for K > 2 it applies to
            the mean over the foreground classes).

    Returns:
        (B, R) weights summing to 1 per image.
    """
    present = _present(masks, rater_mask, checked)
    vote = majority_vote(masks, present, num_classes)
    dice = foreground_dice(masks.flatten(2), vote.flatten(1)[:, None], num_classes)
    if zero_dice == "one":
        dice = torch.where(dice > 0, dice, torch.ones_like(dice))
    dice = dice * present
    fallback = present.float()
    dice = torch.where(dice.sum(1, keepdim=True) > 0, dice, fallback)
    return dice / dice.sum(1, keepdim=True)


def fuse_raters(
    masks: torch.Tensor,
    rater_mask: torch.Tensor | None = None,
    num_classes: int = 2,
    method: str = "random",
    smoothing: float = 0.1,
    generator: torch.Generator | None = None,
    *,
    checked: bool = False,
    recipe: str = "probseg",
    zero_dice: str | None = None,
    smoothing_label: str | None = None,
    smoothing_region: str | None = None,
    boundary_width: int | None = None,
) -> torch.Tensor:
    """The training target of each image from its raters (see the module docstring).

    Args:
        masks: (B, R, H, W) integer class ids.
        rater_mask: (B, R) bool, True where the rater annotated the image (None: all did).
        num_classes: K.
        method: one of :data:`FUSIONS`.
        smoothing: eps of ``"label_smoothing"``, in [0, 1).
        generator: randomness of ``"random"`` and ``"label_smoothing"``.
        checked: as in :func:`random_rater`.
        recipe: ``"probseg"`` (default) or ``"paper"``: the defaults of the four options below
            (:data:`FUSION_RECIPES`).
        zero_dice: ``"weighted_mean"``: the weight of a rater whose Dice is 0, ``"zero"`` or
            ``"one"`` (:func:`rater_weights`).
        smoothing_label: ``"label_smoothing"`` smooths one ``"random"`` rater or the
            ``"majority"`` vote.
        smoothing_region: ``"label_smoothing"`` smooths ``"all"`` pixels or only those near a
            label boundary (``"boundary"``: another class within ``boundary_width`` pixels; 1 =
            the 3 x 3 window).
        boundary_width: see ``smoothing_region`` (>= 1).

    Returns:
        (B, K, H, W) float32 maps summing to 1 over K at every pixel.
    """
    if method not in FUSIONS:
        raise ValueError(f"unknown fusion {method!r}; expected one of {FUSIONS}")
    if masks.ndim != 4:
        raise ValueError(f"expected rater masks of shape (B, R, H, W), got {tuple(masks.shape)}")
    options = fusion_options(recipe, zero_dice=zero_dice, smoothing_label=smoothing_label,
                             smoothing_region=smoothing_region, boundary_width=boundary_width)
    if method == "random" or (method == "label_smoothing" and options["smoothing_label"] == "random"):
        labels = random_rater(masks, rater_mask, generator, checked=checked)
        if method == "random":
            return one_hot(labels, num_classes)
        return _smooth(labels, num_classes, smoothing, options)
    present = _present(masks, rater_mask, checked)
    if method in ("majority", "label_smoothing"):
        vote = majority_vote(masks, present, num_classes)
        return one_hot(vote, num_classes) if method == "majority" else _smooth(vote, num_classes, smoothing, options)
    if method == "mean":
        weights = present.float() / present.sum(1, keepdim=True)
    else:
        weights = rater_weights(masks, present, num_classes, checked=True, zero_dice=options["zero_dice"])
    masks = torch.where(present[:, :, None, None], masks, 0)  # absent slots may hold any filler
    return torch.einsum("br,brkhw->bkhw", weights, one_hot(masks, num_classes))


def _smooth(labels: torch.Tensor, num_classes: int, eps: float, options: dict[str, Any]) -> torch.Tensor:
    """(B, H, W) class ids -> one-hot maps smoothed to (1 - eps) y + eps / K, everywhere or near a
    label boundary (``options["smoothing_region"]``)."""
    if not 0 <= eps < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {eps}")
    target = one_hot(labels, num_classes)
    smoothed = (1 - eps) * target + eps / num_classes
    if options["smoothing_region"] == "all":
        return smoothed
    near = label_boundary(labels, num_classes, options["boundary_width"])
    return torch.where(near[:, None], smoothed, target)


def training_target(
    masks: torch.Tensor,
    rater_mask: torch.Tensor | None = None,
    num_classes: int = 2,
    method: str = "random",
    smoothing: float = 0.1,
    generator: torch.Generator | None = None,
    *,
    checked: bool = False,
    **options: Any,
) -> torch.Tensor:
    """The target a model learns from: (B, H, W) class ids for the hard fusions ``"random"`` and
    ``"majority"`` (the cross-entropy of class ids equals that of their one-hot maps, without
    building them), (B, K, H, W) probabilities from :func:`fuse_raters` otherwise. Arguments as
    in :func:`fuse_raters` (``options``: its ``recipe`` and the options it sets)."""
    if method == "random":
        return random_rater(masks, rater_mask, generator, checked=checked)
    if method == "majority":
        return majority_vote(masks, rater_mask, num_classes)
    return fuse_raters(masks, rater_mask, num_classes, method, smoothing, generator, checked=checked, **options)

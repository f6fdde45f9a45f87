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
"""

from __future__ import annotations

import torch

from probseg._ops import check_rater_mask, foreground_dice, majority_vote, one_hot

__all__ = [
    "FUSIONS", "foreground_dice", "fuse_raters", "majority_vote", "one_hot", "random_rater", "rater_weights",
    "training_target",
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


def _present(masks: torch.Tensor, rater_mask: torch.Tensor | None, checked: bool) -> torch.Tensor:
    """The (B, R) bool mask of present raters; checked by :func:`check_rater_mask` unless the batch
    already was."""
    if not checked:
        return check_rater_mask(rater_mask, masks)
    return torch.ones(masks.shape[:2], dtype=torch.bool, device=masks.device) if rater_mask is None else rater_mask


def rater_weights(masks: torch.Tensor, rater_mask: torch.Tensor | None, num_classes: int, *,
                  checked: bool = False) -> torch.Tensor:
    """Each rater's Dice against the per-pixel majority vote, normalized over the image's raters.

    Dice is averaged over the foreground classes 1..K-1 (a class empty in both maps scores 1).
    Absent raters get 0. An image whose raters all score 0 falls back to uniform weights.

    Args:
        checked: as in :func:`random_rater`.

    Returns:
        (B, R) weights summing to 1 per image.
    """
    present = _present(masks, rater_mask, checked)
    vote = majority_vote(masks, present, num_classes)
    dice = foreground_dice(masks.flatten(2), vote.flatten(1)[:, None], num_classes) * present
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

    Returns:
        (B, K, H, W) float32 maps summing to 1 over K at every pixel.
    """
    if method not in FUSIONS:
        raise ValueError(f"unknown fusion {method!r}; expected one of {FUSIONS}")
    if masks.ndim != 4:
        raise ValueError(f"expected rater masks of shape (B, R, H, W), got {tuple(masks.shape)}")
    if method in ("random", "label_smoothing"):
        target = one_hot(random_rater(masks, rater_mask, generator, checked=checked), num_classes)
        if method == "label_smoothing":
            if not 0 <= smoothing < 1:
                raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
            target = (1 - smoothing) * target + smoothing / num_classes
        return target
    present = _present(masks, rater_mask, checked)
    if method == "majority":
        return one_hot(majority_vote(masks, present, num_classes), num_classes)
    if method == "mean":
        weights = present.float() / present.sum(1, keepdim=True)
    else:
        weights = rater_weights(masks, present, num_classes, checked=True)
    masks = torch.where(present[:, :, None, None], masks, 0)  # absent slots may hold any filler
    return torch.einsum("br,brkhw->bkhw", weights, one_hot(masks, num_classes))


def training_target(
    masks: torch.Tensor,
    rater_mask: torch.Tensor | None = None,
    num_classes: int = 2,
    method: str = "random",
    smoothing: float = 0.1,
    generator: torch.Generator | None = None,
    *,
    checked: bool = False,
) -> torch.Tensor:
    """The target a model learns from: (B, H, W) class ids for the hard fusions ``"random"`` and
    ``"majority"`` (the cross-entropy of class ids equals that of their one-hot maps, without
    building them), (B, K, H, W) probabilities from :func:`fuse_raters` otherwise. Arguments as
    in :func:`fuse_raters`."""
    if method == "random":
        return random_rater(masks, rater_mask, generator, checked=checked)
    if method == "majority":
        return majority_vote(masks, rater_mask, num_classes)
    return fuse_raters(masks, rater_mask, num_classes, method, smoothing, generator, checked=checked)

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


def random_rater(
    masks: torch.Tensor,
    rater_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one available rater per image, uniformly.

    Randomness comes from ``generator`` or, when None, torch's global RNG (seeded by Lightning's
    ``seed_everything``), so a run is reproducible under its seed.

    Args:
        masks: (B, R, H, W) integer class ids.
        rater_mask: (B, R) bool, True where the rater annotated the image (None: all did).
        generator: optional torch.Generator on ``masks.device``.

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
        if not bool(rater_mask.any(dim=1).all()):
            raise ValueError("every image needs at least one rater (a rater_mask row is all False)")
        index = torch.multinomial(rater_mask.float(), 1, generator=generator).squeeze(1)
    return masks[torch.arange(b, device=masks.device), index]


def majority_vote(
    masks: torch.Tensor, rater_mask: torch.Tensor | None = None, num_classes: int | None = None
) -> torch.Tensor:
    """Per-pixel majority vote of the available raters.

    Ties go to the lowest class id (for a binary 2-2 split: background), so the vote is
    deterministic.

    Args:
        masks: (B, R, H, W) integer class ids.
        rater_mask: (B, R) bool, True where the rater annotated the image (None: all did).
        num_classes: K; None uses ``masks.max() + 1``.

    Returns:
        (B, H, W) int64 class ids.
    """
    if masks.ndim != 4:
        raise ValueError(f"expected rater masks of shape (B, R, H, W), got {tuple(masks.shape)}")
    if masks.is_floating_point() or masks.dtype == torch.bool:
        masks = masks.long()
    b, r = masks.shape[:2]
    if rater_mask is None:
        rater_mask = torch.ones(b, r, dtype=torch.bool, device=masks.device)
    elif rater_mask.shape != (b, r):
        raise ValueError(f"rater_mask must have shape {(b, r)}, got {tuple(rater_mask.shape)}")
    k = int(masks.max()) + 1 if num_classes is None else num_classes
    weight = rater_mask.to(torch.float32)[:, :, None, None]
    votes = torch.stack([((masks == c).float() * weight).sum(dim=1) for c in range(max(k, 1))], dim=1)
    return votes.argmax(dim=1)  # first maximum on ties: the lowest class id


FUSIONS = ("random", "majority", "mean", "weighted_mean", "label_smoothing")
"""Fusion methods of :func:`fuse_raters`."""


def _present(masks: torch.Tensor, rater_mask: torch.Tensor | None) -> torch.Tensor:
    b, r = masks.shape[:2]
    if rater_mask is None:
        return torch.ones(b, r, dtype=torch.bool, device=masks.device)
    if rater_mask.shape != (b, r):
        raise ValueError(f"rater_mask must have shape {(b, r)}, got {tuple(rater_mask.shape)}")
    if not bool(rater_mask.any(dim=1).all()):
        raise ValueError("every image needs at least one rater (a rater_mask row is all False)")
    return rater_mask.bool()


def one_hot(labels: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(..., H, W) class ids -> (..., K, H, W) one-hot maps."""
    return torch.nn.functional.one_hot(labels.long(), num_classes).movedim(-1, -3).to(dtype)


def foreground_dice(a: torch.Tensor, b: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dice of two class-id maps, one-vs-rest per foreground class 1..K-1 (a class empty in both
    scores 1), averaged over those classes.

    Args:
        a, b: (..., N) integer class ids, broadcastable against each other.
        num_classes: K.
        dtype: of the counts and the result.

    Returns:
        (...) Dice values in [0, 1].
    """
    scores = []
    for c in range(1, num_classes):
        a_c, b_c = a == c, b == c
        inter = (a_c & b_c).sum(-1).to(dtype)
        total = (a_c.sum(-1) + b_c.sum(-1)).to(dtype)
        scores.append(torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total)))
    return torch.stack(scores).mean(0)


def rater_weights(masks: torch.Tensor, rater_mask: torch.Tensor | None, num_classes: int) -> torch.Tensor:
    """Each rater's Dice against the per-pixel majority vote, normalized over the image's raters.

    Dice is averaged over the foreground classes 1..K-1 (a class empty in both maps scores 1).
    Absent raters get 0. An image whose raters all score 0 falls back to uniform weights.

    Returns:
        (B, R) weights summing to 1 per image.
    """
    present = _present(masks, rater_mask)
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
) -> torch.Tensor:
    """The training target of each image from its raters (see the module docstring).

    Args:
        masks: (B, R, H, W) integer class ids.
        rater_mask: (B, R) bool, True where the rater annotated the image (None: all did).
        num_classes: K.
        method: one of :data:`FUSIONS`.
        smoothing: eps of ``"label_smoothing"``, in [0, 1).
        generator: randomness of ``"random"`` and ``"label_smoothing"``.

    Returns:
        (B, K, H, W) float32 maps summing to 1 over K at every pixel.
    """
    if method not in FUSIONS:
        raise ValueError(f"unknown fusion {method!r}; expected one of {FUSIONS}")
    if masks.ndim != 4:
        raise ValueError(f"expected rater masks of shape (B, R, H, W), got {tuple(masks.shape)}")
    if method in ("random", "label_smoothing"):
        target = one_hot(random_rater(masks, rater_mask, generator), num_classes)
        if method == "label_smoothing":
            if not 0 <= smoothing < 1:
                raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
            target = (1 - smoothing) * target + smoothing / num_classes
        return target
    present = _present(masks, rater_mask)
    if method == "majority":
        return one_hot(majority_vote(masks, present, num_classes), num_classes)
    if method == "mean":
        weights = present.float() / present.sum(1, keepdim=True)
    else:
        weights = rater_weights(masks, present, num_classes)
    masks = torch.where(present[:, :, None, None], masks, 0)  # absent slots may hold any filler
    return torch.einsum("br,brkhw->bkhw", weights, one_hot(masks, num_classes))

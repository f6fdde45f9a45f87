"""Rater fusion: how the R rater masks of an image become the training target.

It holds the PU-Net convention: one rater drawn per image per step.
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

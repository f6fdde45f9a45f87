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

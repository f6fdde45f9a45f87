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
    per_pixel = F.cross_entropy(logits, target, reduction="none")  # (B, H, W)
    if pixel_reduction == "sum":
        per_image = per_pixel.flatten(1).sum(1)
    elif pixel_reduction == "mean":
        per_image = per_pixel.flatten(1).mean(1)
    else:
        raise ValueError(f"pixel_reduction must be 'sum' or 'mean', got {pixel_reduction!r}")
    return reduce_batch(per_image, reduction)

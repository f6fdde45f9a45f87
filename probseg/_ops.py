"""The bottom floor: tensor helpers and input checks shared by data, losses, metrics and
calibration.

Imports nothing from probseg, and nothing heavier than torch, so every pure layer of the package
(``probseg.losses``, ``probseg.metrics.functional``, ``probseg.calibration``) can use it without
pulling in Lightning or a data module. Check errors name the argument, its shape or its dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

# ----------------------------------------------------------------------------- tensor helpers


def one_hot(labels: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(..., H, W) class ids -> (..., K, H, W) one-hot maps."""
    return torch.nn.functional.one_hot(labels.long(), num_classes).movedim(-1, -3).to(dtype)


def foreground_overlap(a: torch.Tensor, b: torch.Tensor, num_classes: int,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Overlap counts of two class-id maps, one-vs-rest per foreground class 1..K-1: the sums
    behind :func:`foreground_dice`, kept apart so they can be pooled over images.

    Args:
        a, b: (..., N) integer class ids, broadcastable against each other.
        num_classes: K.
        dtype: of the counts.

    Returns:
        (..., K-1, 2): per foreground class, the intersection |a = c and b = c| and the total
        |a = c| + |b = c|.
    """
    counts = []
    for c in range(1, num_classes):
        a_c, b_c = a == c, b == c
        counts.append(torch.stack([(a_c & b_c).sum(-1), a_c.sum(-1) + b_c.sum(-1)], dim=-1).to(dtype))
    return torch.stack(counts, dim=-2)


def dice_from_overlap(counts: torch.Tensor) -> torch.Tensor:
    """(..., K-1, 2) counts of :func:`foreground_overlap` -> (...) Dice 2 |A and B| / (|A| + |B|)
    per foreground class (a class empty in both scores 1), averaged over the classes."""
    inter, total = counts.unbind(-1)
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total)).mean(-1)


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
    return dice_from_overlap(foreground_overlap(a, b, num_classes, dtype))


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


def label_boundary(labels: torch.Tensor, num_classes: int, width: int = 1) -> torch.Tensor:
    """Pixels near a label boundary: a pixel of another class lies within ``width`` pixels.

    Within ``width`` means in the (2w + 1) x (2w + 1) square around the pixel (Chebyshev distance),
    clipped at the image border; each image is its own, so nothing leaks across a batch. ``width``
    1 is the 3 x 3 window of Wang et al.'s boundary label smoothing and KDE region.

    Args:
        labels: (B, H, W) integer class ids in [0, K).
        num_classes: K.
        width: w >= 0 (0: no pixel is near a boundary).

    Returns:
        (B, H, W) bool.
    """
    if width == 0:
        return torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    onehot = one_hot(labels, num_classes)
    present = torch.nn.functional.max_pool2d(onehot, 2 * width + 1, stride=1, padding=width)
    return present.sum(dim=1) > 1.5  # another class than the pixel's own in the window


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """float64 for sums and stored values, except on devices without it (Apple MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


# ----------------------------------------------------------------------------- input checks


def shape_of(x: Any) -> tuple[int, ...]:
    """The shape of ``x`` for an error message, () for a non-tensor."""
    return tuple(getattr(x, "shape", ()))


def check_tensor(x: Any, name: str) -> None:
    """``x`` must be a torch.Tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def check_set(x: torch.Tensor, name: str, rank: int = 4) -> None:
    """``x`` must be a non-empty tensor of rank ``rank`` (a (B, N, H, W) set of masks by default)."""
    check_tensor(x, name)
    if x.ndim != rank:
        layout = {4: "(B, N, H, W)", 5: "(B, N, K, H, W)"}.get(rank, f"rank {rank}")
        raise ValueError(f"{name} must have shape {layout}, got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty, shape {tuple(x.shape)}")


def check_pair(pred: torch.Tensor, target: torch.Tensor, pred_name: str = "pred", target_name: str = "target") -> None:
    """``pred`` (B, S, H, W) and ``target`` (B, R, H, W) must agree on batch and image size."""
    check_set(pred, pred_name)
    check_set(target, target_name)
    if pred.shape[0] != target.shape[0] or pred.shape[-2:] != target.shape[-2:]:
        raise ValueError(
            f"{pred_name} {tuple(pred.shape)} and {target_name} {tuple(target.shape)} must share the batch "
            "size B and the image size (H, W)"
        )
    if pred.device != target.device:
        raise ValueError(f"{pred_name} is on {pred.device} and {target_name} on {target.device}; use one device")


def check_binary(x: torch.Tensor, name: str) -> None:
    """``x`` must hold 0/1 values (bool, integer or float)."""
    if x.dtype == torch.bool:
        return
    if bool(((x != 0) & (x != 1)).any()):
        bad = x[(x != 0) & (x != 1)][0].item()
        raise ValueError(f"{name} must be binary masks (0/1), found the value {bad}")


def check_probabilities(x: torch.Tensor, name: str) -> None:
    """``x`` must be a floating tensor of finite values in [0, 1] (an empty one passes)."""
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating-point probabilities, got dtype {x.dtype}")
    if x.numel() == 0:
        return
    low, high = torch.aminmax(x.detach())  # one pass; NaN propagates into both, Inf lands outside [0, 1]
    if bool(torch.isnan(low) | torch.isnan(high)):
        raise ValueError(f"{name} holds NaN; probabilities must be finite values in [0, 1]")
    if low < 0 or high > 1:
        raise ValueError(f"{name} must lie in [0, 1], found values in [{low.item():.4g}, {high.item():.4g}]")


def check_sums_to_one(x: torch.Tensor, name: str, dim: int) -> None:
    """Class probabilities along ``dim`` must sum to 1 (tolerance scaled to the dtype)."""
    if x.numel() == 0:
        return
    tol = max(1e-2, 4 * x.shape[dim] * torch.finfo(x.dtype).eps)  # loose: half-precision inputs
    sums = x.detach().sum(dim=dim, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    worst = float((sums - 1).abs().max())
    if worst > tol:
        raise ValueError(f"{name} must sum to 1 over the class axis (dim {dim}); the largest deviation is {worst:.4g}")


def check_class_ids(x: torch.Tensor, num_classes: int, name: str, allow_bool: bool = True) -> None:
    """``x`` must hold integer class ids in [0, num_classes) (bool counts as 0/1 ids when
    ``allow_bool``); an empty tensor passes. One host synchronisation."""
    if x.is_floating_point() or x.is_complex() or (x.dtype == torch.bool and not allow_bool):
        raise TypeError(f"{name} must hold integer class ids, got dtype {x.dtype}")
    if x.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(x.long())).tolist()
    if low < 0 or high >= num_classes:
        raise ValueError(f"{name} holds class ids in [{low}, {high}], outside [0, {num_classes - 1}]")


def check_rater_mask(rater_mask: torch.Tensor | None, target: torch.Tensor, name: str = "rater_mask") -> torch.Tensor:
    """The (B, R) bool rater mask of a (B, R, ...) target, all True when None; every image needs
    one rater."""
    b, r = target.shape[:2]
    if rater_mask is None:
        return torch.ones(b, r, dtype=torch.bool, device=target.device)
    if not isinstance(rater_mask, torch.Tensor):
        raise TypeError(f"{name} must be a (B, R) bool tensor, got {type(rater_mask).__name__}")
    if rater_mask.shape != (b, r):
        raise ValueError(f"{name} must have shape (B, R) = {(b, r)}, got {tuple(rater_mask.shape)}")
    if rater_mask.dtype != torch.bool:
        check_binary(rater_mask, name)
    rater_mask = rater_mask.to(device=target.device, dtype=torch.bool)
    if not bool(rater_mask.any(dim=1).all()):
        raise ValueError(f"every image needs at least one rater: a row of {name} is all False")
    return rater_mask


# ----------------------------------------------------------------------------- option checks


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of the strings ``choices``; else ValueError naming ``name``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def resolve_recipe(
    table: Mapping[str, Mapping[str, Any]],
    recipe: str,
    overrides: Mapping[str, Any] | None = None,
    choices: Mapping[str, Sequence[str]] | None = None,
    *,
    prefix: str = "",
    known: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The options of ``recipe`` in ``table`` with ``overrides`` (those not None) over them.

    Args:
        table: recipe name -> its default options.
        recipe: a key of ``table``.
        overrides: options given explicitly; None values keep the recipe's.
        choices: option name -> the strings it accepts, checked after the overrides.
        prefix: how the options are named in errors: ``f"{prefix}recipe must be one of ..."``,
            ``f"{prefix}{option} must be one of ..."``, ``f"unknown {prefix}options ..."``
            (e.g. ``"fusion "``, ``"distillation."``).
        known: the names ``overrides`` may hold (default: the recipe's options).

    Returns:
        A new dict: the recipe's options, updated by the overrides.

    Raises:
        ValueError: an unknown recipe, an unknown option name or a value outside ``choices``.
    """
    check_choice(recipe, f"{prefix}recipe", tuple(table))
    resolved = dict(table[recipe])
    known = tuple(resolved) if known is None else tuple(known)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"unknown {prefix}options {unknown}; expected names from {('recipe', *known)}")
    resolved.update(given)
    for name, accepted in (choices or {}).items():
        check_choice(resolved[name], f"{prefix}{name}", accepted)
    return resolved

"""The batch contract: what every data module yields and every model, loss and transform takes.

A batch is a dict (:class:`Batch`)::

    {"image": (B, C, H, W) float, "masks": (B, R, H, W) integer class ids,
     "rater_mask": (B, R) bool (optional: False where an image has no mask from that rater),
     "id": list of B str (optional: names errors and written files)}

:func:`check_batch_layout` checks keys, ranks, dtypes, devices and agreeing shapes without reading
any value (no host synchronisation); :func:`check_batch` adds the value checks (class ids in range,
finite images, a rater for every image) with ONE host synchronisation for all of them together.
The task runs :func:`check_batch` once per batch; transforms run the layout check.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict

import torch

try:
    from typing import NotRequired
except ImportError:  # Python < 3.11
    from typing_extensions import NotRequired


class Batch(TypedDict):
    """The keys of a batch (see the module docstring)."""

    image: torch.Tensor
    masks: torch.Tensor
    rater_mask: NotRequired[torch.Tensor]
    id: NotRequired[list[str]]


class BatchError(ValueError):
    """A batch does not follow the batch contract; the message names the key and its shape."""


class BatchTypeError(BatchError, TypeError):
    """A batch entry has the wrong type or dtype (also a TypeError)."""


def check_batch_layout(batch: Any, in_channels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Check a batch's keys, types, ranks, dtypes, shapes and devices, reading no values.

    Args:
        batch: a :class:`Batch`.
        in_channels: C the image must have (None: any).

    Returns:
        ``(image, masks)``.

    Raises:
        KeyError: ``image`` or ``masks`` is missing.
        BatchError: a shape, dtype or device is wrong (:class:`BatchTypeError` for types).
    """
    if not isinstance(batch, Mapping):
        raise BatchTypeError(f"batch must be a dict with 'image' and 'masks', got {type(batch).__name__}")
    for key in ("image", "masks"):
        if key not in batch:
            raise KeyError(f"batch has no {key!r} entry (keys: {sorted(batch)}); batches are dicts with 'image' and 'masks'")
        if not isinstance(batch[key], torch.Tensor):
            raise BatchTypeError(f"batch[{key!r}] must be a torch.Tensor, got {type(batch[key]).__name__}")
    image, masks = batch["image"], batch["masks"]
    if image.ndim != 4 or not image.is_floating_point():
        raise BatchTypeError(f"batch['image'] must be a (B, C, H, W) float tensor, got {image.dtype} {tuple(image.shape)}")
    if in_channels is not None and image.shape[1] != in_channels:
        raise BatchError(f"batch['image'] must be (B, {in_channels}, H, W), got {tuple(image.shape)}")
    if masks.ndim != 4 or masks.is_floating_point() or masks.is_complex() or masks.dtype == torch.bool:
        raise BatchTypeError(
            f"batch['masks'] must be a (B, R, H, W) integer tensor (integer class ids), got {masks.dtype} "
            f"{tuple(masks.shape)}"
        )
    if (image.shape[0], *image.shape[2:]) != (masks.shape[0], *masks.shape[2:]):
        raise BatchError(
            f"batch['image'] {tuple(image.shape)} and batch['masks'] {tuple(masks.shape)} must agree in B, H and W"
        )
    if image.device != masks.device:
        raise BatchError(f"batch['image'] is on {image.device} but batch['masks'] on {masks.device}")
    rater_mask = batch.get("rater_mask")
    if rater_mask is not None and (
        not isinstance(rater_mask, torch.Tensor) or rater_mask.shape != masks.shape[:2] or rater_mask.dtype != torch.bool
    ):
        got = f"{tuple(rater_mask.shape)} {rater_mask.dtype}" if isinstance(rater_mask, torch.Tensor) else type(rater_mask).__name__
        raise BatchError(f"batch['rater_mask'] must be a (B, R) = {tuple(masks.shape[:2])} bool tensor, got {got}")
    return image, masks


def check_batch(batch: Any, in_channels: int | None = None, num_classes: int | None = None) -> None:
    """The whole batch contract: :func:`check_batch_layout`, then class ids in [0, K), finite
    images and a rater for every image, read with one host synchronisation.

    Args:
        batch: a :class:`Batch`.
        in_channels: C the image must have (None: any).
        num_classes: K the class ids must fit (None: only non-negative ids are required).

    Raises:
        KeyError, BatchError: as :func:`check_batch_layout`, and for a value out of contract (the
            message names the image by its ``id`` when the batch has one).
    """
    image, masks = check_batch_layout(batch, in_channels)
    if masks.numel() == 0 or image.numel() == 0:
        raise BatchError(f"batch is empty: image {tuple(image.shape)}, masks {tuple(masks.shape)}")
    low, high = torch.aminmax(masks)
    finite = torch.isfinite(image.flatten(1)).all(dim=1)  # (B,)
    first_bad = torch.where(finite, image.shape[0], torch.arange(image.shape[0], device=image.device)).min()
    rater_mask = batch.get("rater_mask")
    no_rater = (~rater_mask.any(dim=1)).sum() if rater_mask is not None else torch.zeros((), device=image.device)
    low, high, first_bad, no_rater = torch.stack([low.long(), high.long(), first_bad, no_rater.long()]).tolist()
    if low < 0 or (num_classes is not None and high >= num_classes):
        allowed = f"[0, {num_classes - 1}] for num_classes={num_classes}" if num_classes is not None else "[0, inf)"
        raise BatchError(f"batch['masks'] holds class ids in [{low}, {high}], outside {allowed}")
    if first_bad < image.shape[0]:
        ids = batch.get("id")
        name = ids[first_bad] if isinstance(ids, (list, tuple)) else f"number {first_bad} of the batch"
        raise BatchError(f"batch['image'] of image {name} holds NaN or Inf")
    if no_rater:
        raise BatchError(f"every image needs at least one rater: {no_rater} row(s) of batch['rater_mask'] are all False")

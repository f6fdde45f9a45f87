"""Pairwise kernels between a set of S predictions and a set of R rater masks.

Every kernel maps pred (B, S, H, W) and target (B, R, H, W) to a cost (B, S, R) in one batched,
vectorized computation (no loop over pairs):

* ``"iou"``: 1 - IoU and ``"dice"``: 1 - Dice, from one matrix product of the flattened masks
  (intersections) and the mask sizes;
* ``"hausdorff"``: the symmetric Hausdorff distance in pixels between the foreground pixel sets,
  exact Euclidean (Valiuddin et al., eq. 16). Each mask gets ONE distance transform (S + R per
  image, never S x R), restricted to the box holding every foreground pixel of the image; the
  directed distance h(A -> B) is the max over A of the transform of B. On CPU the transforms are
  scipy's exact linear-time EDT; on other devices a batched exact brute force in torch;
* ``"ce"``: pred are foreground probabilities; per-pixel binary cross-entropy, mean over pixels,
  probabilities clamped to [eps, 1 - eps]: sum_n log(1 - p) once per hypothesis (every pixel) and
  the rater-dependent part logit(p) . t on the raters' foreground window only.

Conventions (the same for every kernel unless stated):

* both masks empty: cost 0 (for ``"ce"``: the target is empty and every probability is exactly 0);
* exactly one mask empty: 1 for ``"iou"`` and ``"dice"``; for ``"hausdorff"`` the option
  ``hausdorff_empty`` (:data:`HAUSDORFF_EMPTY`; default the image diagonal sqrt(H^2 + W^2));
  ``"ce"`` needs no convention (it is finite whenever one side is non-empty).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import numpy as np
import torch

from probseg._ops import (
    accumulation_dtype,
    check_binary,
    check_class_ids,
    check_pair,
    check_probabilities,
    check_set,
)

KERNELS = ("iou", "dice", "hausdorff", "ce")
"""Names accepted by :func:`pairwise_cost`."""



def check_hausdorff_empty(rule: str) -> str:
    """``rule``, validated against :data:`HAUSDORFF_EMPTY`."""
    if rule not in HAUSDORFF_EMPTY:
        raise ValueError(f"hausdorff_empty must be one of {HAUSDORFF_EMPTY}, got {rule!r}")
    return rule


def check_kernels(kernels: Sequence[str]) -> tuple[str, ...]:
    """The kernels, validated against :data:`KERNELS` (an error names the unknown ones)."""
    unknown = [k for k in kernels if k not in KERNELS]
    if unknown:
        raise ValueError(f"unknown kernels {unknown}; expected a subset of {KERNELS}")
    return tuple(kernels)


CE_EPS = 1e-7
"""Default clamp of the probabilities of the ``"ce"`` kernel: a certain mistake costs about
-log(1e-7) ~ 16.1 nats per pixel instead of infinity. The clamp happens in the input's precision:
in float32, 1 - 1e-7 rounds to 1 - 1.19e-7, so a certain false positive costs 15.9 nats."""

CE_READINGS = ("mean", "sum", "binarized")
"""Readings of the ``"ce"`` kernel (the cSAE paper's H_ce, its eq. 19):

* ``"mean"`` (default): the binary cross-entropy of the foreground probabilities against the
  rater mask, mean over pixels, probabilities clamped to [eps, 1 - eps];
* ``"sum"``: the same summed over pixels, as eq. 19 writes it (H W times ``"mean"``);
* ``"binarized"``: torch's ``binary_cross_entropy`` of the binarised prediction (p > 0.5)
  against the mask, whose log is clamped at -100: 100 times the fraction of pixels where the
  two disagree. The scale of the paper's Table 1 (0.3 on LIDC nodules, 3 on brain growth, next
  to 1 - IoU of 0.31 and 0.15) fits this reading, not the other two: a reading of the table,
  not a statement of the paper."""

HAUSDORFF_EMPTY = ("diagonal", "max_distance", "nan")
"""The Hausdorff distance between a mask and an empty mask (undefined: the distance from a point
to the empty set is infinite). Codebases differ:

* ``"diagonal"`` (default): the image diagonal sqrt(H^2 + W^2), the largest distance two pixels
  of the image can have: a fixed, finite penalty, the same wherever the mask lies;
* ``"max_distance"``: the Hausdorff distance between the non-empty mask and the whole image
  grid, i.e. the distance from the mask to the image pixel farthest from it (at most the
  diagonal): the penalty of an empty mask as if it could lie anywhere;
* ``"nan"``: NaN, the pair has no distance. An image with such a pair gets a NaN matched cost
  (:func:`~probseg.metrics.functional.sets.matched_cost`) and is left out of the means over images
  (the results tables count the images left out), as codebases do that skip undefined
  distances (MONAI-style metrics warn and return NaN/inf; medpy raises)."""

BINARIZED_LOG_CLAMP = 100.0
"""-log 0 in torch's binary_cross_entropy (its log is clamped at -100)."""

# Bound on the elements of one broadcast intermediate (64 MiB of float32).
_CHUNK_ELEMENTS = 1 << 24


def pairwise_cost(
    pred: torch.Tensor, target: torch.Tensor, kernel: str = "iou", *, eps: float = CE_EPS, ce_reading: str = "mean",
    hausdorff_empty: str = "diagonal",
) -> torch.Tensor:
    """Cost of every (prediction, rater) pair of each image.

    Args:
        pred: (B, S, H, W) binary masks (bool, integer or 0/1 float), or foreground
            probabilities in [0, 1] for ``kernel="ce"``.
        target: (B, R, H, W) binary rater masks.
        kernel: one of :data:`KERNELS`.
        eps: probability clamp of the ``"ce"`` kernel.
        ce_reading: one of :data:`CE_READINGS`.
        hausdorff_empty: one of :data:`HAUSDORFF_EMPTY` (a Hausdorff distance to an empty mask).

    Returns:
        (B, S, R) float32 costs; see the module docstring for the empty-mask conventions.
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")
    if kernel == "ce":
        return pairwise_costs(None, target, ("ce",), probs=pred, eps=eps, ce_reading=ce_reading)["ce"]
    return pairwise_costs(pred, target, (kernel,), hausdorff_empty=hausdorff_empty)[kernel]


def pairwise_costs(
    pred: torch.Tensor | None,
    target: torch.Tensor,
    kernels: Sequence[str] = KERNELS,
    *,
    probs: torch.Tensor | None = None,
    eps: float = CE_EPS,
    ce_reading: str = "mean",
    hausdorff_empty: str = "diagonal",
) -> dict[str, torch.Tensor]:
    """Several kernels at once, sharing the work: one foreground window per image, one
    intersection product for "iou" and "dice", one distance transform per mask.

    Args:
        pred: (B, S, H, W) binary masks (needed by "iou", "dice", "hausdorff").
        target: (B, R, H, W) binary rater masks.
        kernels: names from :data:`KERNELS`.
        probs: (B, S, H, W) foreground probabilities (needed by "ce").
        eps: probability clamp of the ``"ce"`` kernel.
        ce_reading: one of :data:`CE_READINGS`.
        hausdorff_empty: one of :data:`HAUSDORFF_EMPTY`.

    Returns:
        ``{kernel: (B, S, R) float32 cost}``.
    """
    check_kernels(kernels)
    if ce_reading not in CE_READINGS:
        raise ValueError(f"ce_reading must be one of {CE_READINGS}, got {ce_reading!r}")
    check_hausdorff_empty(hausdorff_empty)
    costs: dict[str, torch.Tensor] = {}
    if "ce" in kernels:
        if probs is None:
            raise ValueError("the 'ce' kernel needs foreground probabilities: pass probs=(B, S, H, W)")
        check_pair(probs, target, "pred")
        check_binary(target, "target")
        check_probabilities(probs, "pred")
        if ce_reading == "binarized":
            costs["ce"] = _binarized_cross_entropy_cost(probs, target)
        else:
            costs["ce"] = _cross_entropy_cost(probs, target, eps)
            if ce_reading == "sum":
                costs["ce"] = costs["ce"] * probs.shape[-2] * probs.shape[-1]
    masks = [k for k in kernels if k != "ce"]
    if masks:
        if pred is None:
            raise ValueError(f"the kernels {masks} need binary masks: pass pred=(B, S, H, W)")
        check_pair(pred, target)
        check_binary(pred, "pred")
        check_binary(target, "target")
        same = target is pred  # a set against itself: one tensor, packed once
        pred = pred.bool()
        target = pred if same else target.bool()
        windows = foreground_windows(pred, target)
        if "iou" in masks or "dice" in masks:
            costs.update(_overlap_costs(pred, target, windows, [k for k in masks if k in ("iou", "dice")]))
        if "hausdorff" in masks:
            costs["hausdorff"] = _hausdorff_cost(pred, target, windows, empty_rule=hausdorff_empty)
    return {k: costs[k] for k in kernels}


def per_class_pairwise_cost(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, kernel: str = "iou", *, average: bool = True,
    eps: float = CE_EPS, ce_reading: str = "mean", hausdorff_empty: str = "diagonal",
) -> torch.Tensor:
    """Multi-class wrapper of :func:`pairwise_cost`: one binary (one-vs-rest) cost per foreground
    class 1..K-1.

    Args:
        pred: (B, S, H, W) integer class ids, or (B, S, K, H, W) class probabilities for
            ``kernel="ce"``.
        target: (B, R, H, W) integer class ids.
        num_classes: K (binary = 2).
        kernel: one of :data:`KERNELS`.
        average: mean over the foreground classes (one cost per pair, so a hypothesis is matched
            as a whole segmentation); False keeps them apart.
        eps: probability clamp of the ``"ce"`` kernel.
        ce_reading: one of :data:`CE_READINGS` (``"binarized"``: each class's p > 0.5).
        hausdorff_empty: one of :data:`HAUSDORFF_EMPTY`.

    Returns:
        (B, S, R) with ``average``, else (B, K - 1, S, R).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    check_set(target, "target")
    check_class_ids(target, num_classes, "target")
    if kernel == "ce":
        check_set(pred, "pred", rank=5)
        if pred.shape[2] != num_classes:
            raise ValueError(f"pred must hold {num_classes} class probabilities on dim 2, got {tuple(pred.shape)}")
        per_class = [pairwise_cost(pred[:, :, c], target == c, "ce", eps=eps, ce_reading=ce_reading)
                     for c in range(1, num_classes)]
    else:
        check_set(pred, "pred")
        check_class_ids(pred, num_classes, "pred")
        per_class = [pairwise_cost(pred == c, target == c, kernel, hausdorff_empty=hausdorff_empty)
                     for c in range(1, num_classes)]
    costs = torch.stack(per_class, dim=1)
    return costs.mean(dim=1) if average else costs


def foreground_windows(*sets: torch.Tensor) -> list[tuple[int, int, int, int] | None]:
    """Per image, the bounding box (row0, row1, col0, col1), end exclusive, of the foreground of
    every mask of the given (B, N, H, W) sets; None for an image without foreground. Overlaps and
    distances between pixels inside the box are those of the full image, so the kernels work on
    boxes."""
    union = None
    for masks in sets:
        u = _union_over_set(masks.detach().cpu().numpy())
        union = u if union is None else union | u
    rows, cols = union.any(axis=2), union.any(axis=1)
    return [_box(r, c) if r.any() else None for r, c in zip(rows, cols)]


def _union_over_set(masks: np.ndarray) -> np.ndarray:
    """(B, N, H, W) bool -> (B, H, W) any over N. Bytes of a bool array are 0 or 1, so OR-ing
    them 8 at a time as uint64 words gives the union in one pass (6x numpy's multi-axis any)."""
    b, n, h, w = masks.shape
    if masks.dtype != np.bool_:
        masks = masks != 0
    if (h * w) % 8 == 0 and masks.flags.c_contiguous:
        return np.bitwise_or.reduce(masks.reshape(b, n, h * w).view(np.uint64), axis=1).view(np.bool_).reshape(b, h, w)
    return masks.any(axis=1)


def _common_crop(masks: torch.Tensor, windows: list[tuple[int, int, int, int] | None]) -> torch.Tensor:
    """(B, N, h, w): one window size for the batch (the largest box), placed over each image's box."""
    _, _, height, width = masks.shape
    boxes = [w for w in windows if w is not None]
    h = max(r1 - r0 for r0, r1, _, _ in boxes)
    w = max(c1 - c0 for _, _, c0, c1 in boxes)
    crops = []
    for i, box in enumerate(windows):
        r0, c0 = (0, 0) if box is None else (min(box[0], height - h), min(box[2], width - w))
        crops.append(masks[i, :, r0 : r0 + h, c0 : c0 + w])
    return torch.stack(crops)


def _packed_counts(pred: torch.Tensor, target: torch.Tensor, windows: list[tuple[int, int, int, int] | None]
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B, S, R) intersections and (B, S, 1), (B, 1, R) sizes, exact, from the masks packed 64
    pixels to a word (inside the box holding every image's foreground) and counted with popcount."""
    boxes = [w for w in windows if w is not None]
    r0, r1 = min(w[0] for w in boxes), max(w[1] for w in boxes)
    c0, c1 = min(w[2] for w in boxes), max(w[3] for w in boxes)
    b, s, r = pred.shape[0], pred.shape[1], target.shape[1]
    words_p = _pack(pred.numpy()[:, :, r0:r1, c0:c1]).reshape(b, s, -1)
    # A set against itself (GED's within-set terms, diversity) is packed once.
    words_t = words_p if target is pred else _pack(target.numpy()[:, :, r0:r1, c0:c1]).reshape(b, r, -1)
    inter = np.empty((b, s, r), dtype=np.int64)
    step = max(1, _CHUNK_ELEMENTS // max(1, s * r * words_p.shape[-1]))  # images per bounded (step, S, R, words) AND
    for i in range(0, b, step):
        both = words_p[i : i + step, :, None, :] & words_t[i : i + step, None, :, :]
        inter[i : i + step] = np.bitwise_count(both).sum(-1, dtype=np.int64)
    size_p = np.bitwise_count(words_p).sum(-1, dtype=np.int64)[:, :, None]
    size_t = np.bitwise_count(words_t).sum(-1, dtype=np.int64)[:, None, :]
    return inter, size_p, size_t


def _pack(masks: np.ndarray) -> np.ndarray:
    """(..., h, w) bool -> (prod(...), words) uint64, 64 pixels per word (zero padded)."""
    bits = np.packbits(masks.reshape(-1, masks.shape[-2] * masks.shape[-1]), axis=-1)
    pad = (-bits.shape[1]) % 8
    if pad:
        bits = np.pad(bits, ((0, 0), (0, pad)))
    return np.ascontiguousarray(bits).view(np.uint64)


def _overlap_costs(
    pred: torch.Tensor, target: torch.Tensor, windows: list[tuple[int, int, int, int] | None], kernels: list[str],
    packed: bool | None = None,
) -> dict[str, torch.Tensor]:
    """``packed`` None: popcount of packed bits on CPU tensors (numpy >= 2), matrix products elsewhere."""
    b, s, r = pred.shape[0], pred.shape[1], target.shape[1]
    if all(w is None for w in windows):
        return {k: torch.zeros(b, s, r, device=pred.device) for k in kernels}
    if packed is None:
        packed = pred.device.type == "cpu" and hasattr(np, "bitwise_count")
    if packed:
        inter, size_p, size_t = (torch.from_numpy(a).double() for a in _packed_counts(pred, target, windows))
    else:  # one matrix product per image: the fast path on GPUs
        p, t = (_common_crop(x, windows).flatten(2) for x in (pred, target))
        # Pixel counts are exact in float32 below 2**24 pixels per image.
        dtype = torch.float32 if p.shape[-1] < (1 << 24) else torch.float64
        p, t = p.to(dtype), t.to(dtype)
        inter = p @ t.transpose(1, 2)
        size_p, size_t = p.sum(-1)[:, :, None], t.sum(-1)[:, None, :]
    out = {}
    for kernel in kernels:
        if kernel == "iou":
            denom = size_p + size_t - inter
            score = inter / denom.clamp_min(1)
        else:
            denom = size_p + size_t
            score = 2 * inter / denom.clamp_min(1)
        out[kernel] = torch.where(denom > 0, 1 - score, torch.zeros_like(score)).float()
    return out


def _cross_entropy_cost(pred: torch.Tensor, target: torch.Tensor, eps: float,
                        cpu_path: bool | None = None) -> torch.Tensor:
    """(B, S, R) mean binary cross-entropies; ``cpu_path`` None picks the chunked per-image path on
    CPU tensors and the batched one elsewhere."""
    if not 0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps}")
    p = pred.float() if pred.dtype in (torch.float16, torch.bfloat16) else pred
    b, s, h, w = p.shape
    wide = accumulation_dtype(p.device)
    # sum_n t log p + (1 - t) log(1 - p) = sum_n log(1 - p) + t . logit(p). The first sum needs every
    # pixel (one log each); the dot only the pixels some rater marks, so logit(p) is computed on the
    # raters' foreground box alone. Probabilities are clamped in the input's precision. On CPU the
    # images go in chunks of about a megabyte, so the passes over a chunk run in cache.
    windows = foreground_windows(target)
    per_image = s * h * w
    cpu = p.device.type == "cpu" if cpu_path is None else cpu_path
    step = max(1, _CE_CHUNK_ELEMENTS // per_image) if cpu else b
    log_lik = torch.zeros(b, s, target.shape[1], dtype=wide, device=p.device)
    # numpy's SIMD log1p, clip and sum are about 3x torch's on CPU (measured, float32).
    in_numpy = cpu and p.device.type == "cpu" and not p.requires_grad
    for i in range(0, b, step):
        if in_numpy:
            array = np.clip(p[i : i + step].numpy(), eps, 1 - eps)
            clamped = torch.from_numpy(array)
        else:
            clamped = p[i : i + step].clamp(eps, 1 - eps)
        log_lik[i : i + step] += _marked_logit_sums(clamped, target[i : i + step], windows[i : i + step], cpu)
        if in_numpy:  # after the logit sums: the clamped chunk is overwritten in place
            np.log1p(np.negative(array, out=array), out=array)
            log_complement = torch.from_numpy(array.reshape(len(array), s, -1).sum(-1))
        else:
            log_complement = clamped.neg_().log1p_().sum((-2, -1))
        log_lik[i : i + step] += log_complement.to(wide)[:, :, None]
    cost = -log_lik / (h * w)
    # Both empty (cost 0) needs an empty rater: the predictions are only scanned in those images.
    if target.device.type == "cpu":
        empty_target = torch.from_numpy(~target.numpy().reshape(b, target.shape[1], -1).any(axis=-1))
    else:
        empty_target = ~target.flatten(2).any(dim=-1)
    images = torch.nonzero(empty_target.any(dim=1)).flatten().to(p.device)
    if len(images):
        empty_pred = torch.zeros(b, s, dtype=torch.bool, device=p.device)
        empty_pred[images] = ~(p[images].flatten(2) != 0).any(dim=-1)
        both_empty = empty_pred[:, :, None] & empty_target.to(p.device)[:, None, :]
        cost = torch.where(both_empty, torch.zeros_like(cost), cost)
    return cost.float()


_CE_CHUNK_ELEMENTS = 1 << 18
"""Probabilities per chunk of the CPU cross-entropy (1 MiB of float32)."""


def _marked_logit_sums(clamped: torch.Tensor, target: torch.Tensor,
                       windows: list[tuple[int, int, int, int] | None], per_image: bool) -> torch.Tensor:
    """(b, S, R) sums of logit(p) over each rater's marked pixels, on the raters' boxes: per image
    (the CPU path), or one window for the batch and one batched product."""
    b, s = clamped.shape[:2]
    out = torch.zeros(b, s, target.shape[1], dtype=accumulation_dtype(clamped.device), device=clamped.device)
    if all(box is None for box in windows):
        return out
    if per_image:
        for j, box in enumerate(windows):
            if box is not None:
                r0, r1, c0, c1 = box
                logit = torch.logit(clamped[j, :, r0:r1, c0:c1]).flatten(1)
                marked = target[j, :, r0:r1, c0:c1].flatten(1).to(logit.dtype)
                # bmm, not mm: a tiny multi-threaded mm can take milliseconds on some CPU builds
                out[j] = torch.bmm(logit[None], marked.T[None])[0].to(out.dtype)
        return out
    logit = torch.logit(_common_crop(clamped, windows)).flatten(2)
    return torch.bmm(logit, _common_crop(target, windows).flatten(2).to(logit.dtype).transpose(1, 2)).to(out.dtype)


def _binarized_cross_entropy_cost(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """100 x the fraction of pixels where (pred > 0.5) and the target disagree (torch's clamped
    binary cross-entropy of the binarised prediction), from one intersection product."""
    p = (pred > 0.5).flatten(2).to(accumulation_dtype(pred.device))
    t = target.flatten(2).to(p.dtype)
    mismatch = p.sum(-1)[:, :, None] + t.sum(-1)[:, None, :] - 2 * (p @ t.transpose(1, 2))
    return (BINARIZED_LOG_CLAMP * mismatch / p.shape[-1]).float()


def squared_distance_transform(masks: torch.Tensor) -> torch.Tensor:
    """Exact squared Euclidean distance from every pixel to the nearest True pixel.

    Separable and fully batched: the distance to the nearest foreground pixel of each column
    (two cumulative scans), then

    .. math:: D^2(i, j) = \\min_{j'} \\; g(i, j')^2 + (j - j')^2

    evaluated by brute force along the shorter image axis, which is exact for every mask.

    Args:
        masks: (M, H, W) bool.

    Returns:
        (M, H, W) float32 squared distances (exact integers): 0 on True pixels, inf everywhere in a
        mask without a True pixel.
    """
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape (M, H, W), got {tuple(masks.shape)}")
    if masks.shape[2] > masks.shape[1]:
        return squared_distance_transform(masks.transpose(1, 2)).transpose(1, 2)
    m, h, w = masks.shape
    masks = masks.bool()
    rows = torch.arange(h, dtype=torch.float32, device=masks.device).view(1, h, 1)
    inf = torch.tensor(float("inf"), device=masks.device)
    above = torch.where(masks, rows, -inf).cummax(dim=1).values
    below = torch.where(masks, rows, inf).flip(1).cummin(dim=1).values.flip(1)
    g2 = torch.minimum(rows - above, below - rows).square()  # inf in columns without foreground
    cols = torch.arange(w, dtype=torch.float32, device=masks.device)
    dj2 = (cols[:, None] - cols[None, :]).square()  # (w_out, w_in)
    rows_g2 = g2.reshape(m * h, w)
    out = torch.empty(m * h, w, dtype=torch.float32, device=masks.device)
    step = max(1, _CHUNK_ELEMENTS // (w * w))  # image rows per chunk: a bounded (rows, w, w) intermediate
    for start in range(0, m * h, step):
        out[start : start + step] = (rows_g2[start : start + step, None, :] + dj2).amin(dim=-1)
    return out.view(m, h, w)


def _directed(fg: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """(B, S, N) 0/1 masks and (B, R, N) distances -> (B, S, R) max over each mask of each
    distance map: the directed Hausdorff distances of every pair."""
    b, s, n = fg.shape
    r = dist.shape[1]
    out = torch.empty(b, s, r, dtype=dist.dtype, device=dist.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, r * n))  # masks per chunk: a bounded (step, R, N) intermediate
    for i in range(b):
        for start in range(0, s, step):
            out[i, start : start + step] = (fg[i, start : start + step, None, :] * dist[i, None]).amax(dim=-1)
    return out


def _box(rows: np.ndarray, cols: np.ndarray) -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1), end exclusive, of the True entries of row and column flags."""
    rr, cc = np.flatnonzero(rows), np.flatnonzero(cols)
    return int(rr[0]), int(rr[-1]) + 1, int(cc[0]), int(cc[-1]) + 1


def _squared_distances_scipy(masks: np.ndarray) -> np.ndarray:
    """(N, h, w) bool -> (N, h, w) exact squared Euclidean distance to each mask's nearest
    foreground pixel, from scipy's linear-time feature transform (0 for an empty mask)."""
    masks = masks.astype(bool, copy=False)
    n, h, w = masks.shape
    # int32 is exact while h**2 + w**2 < 2**31 and halves the memory traffic of int64.
    dtype = np.int32 if h * h + w * w < (1 << 31) else np.int64
    out = np.zeros((n, h, w), dtype=dtype)
    background = np.ascontiguousarray(~masks).view(np.int8)  # 1 off the mask: the pixels to transform
    filled = np.flatnonzero(~background.reshape(n, -1).all(axis=1))
    if not len(filled):
        return out
    nearest = np.empty((len(filled), 2, h, w), dtype=np.int32)  # each pixel's nearest foreground pixel
    transform = _feature_transform()
    for k, i in enumerate(filled):
        transform(background[i], nearest[k])
    grid = np.indices((h, w), dtype=dtype)
    offset = nearest.astype(dtype, copy=False) - grid
    out[filled] = np.einsum("kchw,kchw->khw", offset, offset)
    return out


def _feature_transform_public(background: np.ndarray, out: np.ndarray) -> None:
    """Write into ``out`` (2, h, w) int32 the (row, col) of the nearest 0 of a (h, w) int8 0/1
    array, through scipy's public ``distance_transform_edt``."""
    from scipy.ndimage import distance_transform_edt

    distance_transform_edt(background.astype(bool), return_distances=False, return_indices=True, indices=out)


@functools.cache
def _feature_transform() -> Callable[[np.ndarray, np.ndarray], None]:
    """:func:`_feature_transform_public`, or the same scipy kernel called directly when this scipy
    has its entry point and it gives the public result on a probe: the public wrapper copies the
    input and checks its arguments on every call, a tenth of the Hausdorff kernel's time on small
    crops."""
    try:
        from scipy.ndimage._nd_image import euclidean_feature_transform

        def direct(background: np.ndarray, out: np.ndarray) -> None:
            euclidean_feature_transform(background, None, out)

        probe = np.array([[1, 1, 0], [1, 1, 1], [0, 1, 1]], dtype=np.int8)
        got, expect = np.empty((2, 3, 3), np.int32), np.empty((2, 3, 3), np.int32)
        direct(probe, got)
        _feature_transform_public(probe, expect)
        if np.array_equal(got, expect):
            return direct
    except Exception:  # noqa: BLE001 - a private entry point that moved or changed: the public route
        pass
    return _feature_transform_public


def _directed_max(query: np.ndarray, d2: np.ndarray) -> np.ndarray:
    """(Q, h, w) masks and (O, h, w) squared distances -> (Q, O) max of each map over each mask."""
    q, o = query.shape[0], d2.shape[0]
    return (query.reshape(q, 1, -1) * d2.reshape(1, o, -1)).max(axis=-1)  # distances are >= 0


def _hausdorff_cost(
    pred: torch.Tensor,
    target: torch.Tensor,
    windows: list[tuple[int, int, int, int] | None],
    use_scipy: bool | None = None,
    empty_rule: str = "diagonal",
) -> torch.Tensor:
    """(B, S, R) symmetric Hausdorff distances; ``use_scipy`` None picks scipy on CPU tensors;
    ``empty_rule`` (:data:`HAUSDORFF_EMPTY`) sets the pairs where exactly one mask is empty."""
    b, s, h, w = pred.shape
    r = target.shape[1]
    if use_scipy is None:
        use_scipy = pred.device.type == "cpu"
    cost = torch.zeros(b, s, r, dtype=torch.float32)
    if all(box is None for box in windows):
        return cost.to(pred.device)  # every mask empty: every pair is "both empty", cost 0
    if use_scipy:
        # On CPU scipy's linear-time transform, on each image's box, beats the batched brute force.
        p_np, t_np = pred.cpu().numpy(), target.cpu().numpy()
        empty = torch.ones(b, s + r, dtype=torch.bool)  # (B, S + R); a mask is empty iff empty in its image's box
        for i, box in enumerate(windows):
            if box is None:
                continue
            r0, r1, c0, c1 = box  # the image's foreground box: every pixel that matters
            p_img, t_img = p_np[i, :, r0:r1, c0:c1], t_np[i, :, r0:r1, c0:c1]
            empty[i] = torch.from_numpy(~np.concatenate([p_img.any(axis=(1, 2)), t_img.any(axis=(1, 2))]))
            forward = _directed_max(p_img, _squared_distances_scipy(t_img))  # h(pred -> target)^2, (S, R)
            backward = _directed_max(t_img, _squared_distances_scipy(p_img)).T  # h(target -> pred)^2
            cost[i] = torch.from_numpy(np.sqrt(np.maximum(forward, backward)))
    else:
        empty = ~torch.cat([pred.flatten(2).any(dim=-1), target.flatten(2).any(dim=-1)], dim=1)  # (B, S + R)
        crop = _common_crop(torch.cat([pred, target], dim=1), windows)
        d2 = squared_distance_transform(crop.flatten(0, 1)).reshape(b, s + r, -1)
        d2 = torch.where(empty[..., None], torch.zeros_like(d2), d2)  # no inf * 0 for empty masks
        fg = crop.flatten(2).float()
        forward = _directed(fg[:, :s], d2[:, s:])
        backward = _directed(fg[:, s:], d2[:, :s]).transpose(1, 2)
        cost = torch.maximum(forward, backward).sqrt()
    cost, empty = cost.to(pred.device), empty.to(pred.device)
    one_empty = empty[:, :s, None] ^ empty[:, None, s:]
    both_empty = empty[:, :s, None] & empty[:, None, s:]
    cost = torch.where(both_empty, torch.zeros_like(cost), cost)
    if not bool(one_empty.any()):
        return cost
    if empty_rule == "diagonal":
        fill = torch.full_like(cost, math.hypot(h, w))
    elif empty_rule == "nan":
        fill = torch.full_like(cost, math.nan)
    else:  # "max_distance": the farthest image pixel from the mask that is not empty
        far = _farthest_pixel_distance(torch.cat([pred, target], dim=1), empty, use_scipy).to(cost.device)  # (B, S + R)
        fill = torch.where(empty[:, :s, None], far[:, None, s:], far[:, :s, None])
    return torch.where(one_empty, fill, cost)


def _farthest_pixel_distance(masks: torch.Tensor, empty: torch.Tensor, use_scipy: bool) -> torch.Tensor:
    """(B, N) distance from each (B, N, H, W) mask to the image pixel farthest from it (the
    Hausdorff distance between the mask and the whole image grid); 0 for empty masks. Only the
    images that hold an empty mask next to a non-empty one are transformed."""
    b, n = empty.shape
    out = torch.zeros(b, n, dtype=torch.float32)
    needed = (empty.any(dim=1) & (~empty).any(dim=1)).cpu()
    for i in torch.nonzero(needed).flatten().tolist():
        keep = torch.nonzero(~empty[i].cpu()).flatten()
        if use_scipy:
            d2 = _squared_distances_scipy(masks[i, keep].cpu().numpy())
            far2 = torch.from_numpy(d2.reshape(len(keep), -1).max(axis=1).astype(np.float64))
        else:
            far2 = squared_distance_transform(masks[i, keep.to(masks.device)]).flatten(1).amax(dim=1).cpu()
        out[i, keep] = far2.double().sqrt().float()
    return out

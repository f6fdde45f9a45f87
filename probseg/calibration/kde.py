"""Kernel-density (KDE) recalibration of a segmentation network's class probabilities.

The calibrated prediction of a network ``f`` is the conditional expectation of the label given
the prediction, ``E[y | f(x)]``: by definition it has zero calibration error, and it is what the
Dice-semimetric paper (Wang et al., Appendix E, "Calibrated Knowledge Distillation") distills
from a teacher instead of ``f(x)`` itself. It is estimated with the consistent kernel estimator
of Popordanoska et al. (2022) over the pixels ``x_i`` of a batch:

.. math::

    \\widehat{E}[y \\mid f(x_j)] = \\frac{\\sum_i w_i \\, k(f(x_j), f(x_i)) \\, y_i}
                                       {\\sum_i w_i \\, k(f(x_j), f(x_i))}

with the Dirichlet kernel (the Beta kernel when K = 2, on the pair (1 - p, p))

.. math::

    k_{Dir}(f_j, f_i) = \\frac{\\Gamma(\\sum_k \\alpha_{ik})}{\\prod_k \\Gamma(\\alpha_{ik})}
                        \\prod_k f_{jk}^{\\alpha_{ik} - 1}, \\qquad \\alpha_i = f_i / h + 1,

``h > 0`` the bandwidth (the paper's best: 1e-3; larger h = smoother). ``y_i`` is a one-hot
label or a soft label (K class probabilities, e.g. fused raters).

Cost
    The paper's O(n^2) full-batch estimator is reduced to O(n * n_key): each batch draws
    ``n_key`` key points (:func:`sample_key_points`) and every pixel is compared with those only.
    The log kernel is one matrix product plus a per-key-point constant:

    .. math:: \\log k(f_j, f_i) = \\sum_k (f_{ik}/h) \\log f_{jk}
              + \\big[\\log\\Gamma(\\textstyle\\sum_k f_{ik}/h + K) - \\sum_k \\log\\Gamma(f_{ik}/h + 1)\\big]

    i.e. (n, K) @ (K, m) plus an (m,) row, and the estimate is
    ``softmax_i(log k + log w_i) @ y``, evaluated in chunks of rows so that the (n, m) kernel never
    exceeds 64 MiB (4 MiB on CPU, cache-friendly) at once. Only the pixels being recalibrated
    (the region, below) are evaluated.

Class-balanced key points and importance weights
    Labels in segmentation are highly unbalanced, so a uniform sample of key points may miss a
    class entirely (its estimated probability would then be 0 everywhere). Following the paper,
    with ``n_unique`` classes present in the batch, ``ceil(n_key / n_unique)`` key points are
    drawn without replacement from each present class (all its pixels if it has fewer), so up to
    ``n_key + n_unique - 1`` key points in all.

    Balancing changes the class proportions among the key points, and the unweighted estimator
    (the paper's) is then biased towards balanced classes: it estimates ``E[y | f]`` under a
    distribution in which every class is equally frequent, not the data's. For a rare
    foreground (5 % of the pixels) the estimate at a well-calibrated f = 0.05 is about 0.5.
    probseg therefore gives each key point of class c the importance weight ``n_c / m_c``
    (pixels of class c in the batch / key points drawn from class c). Stratified sampling with
    these weights makes the numerator and denominator unbiased estimates of the full-batch sums
    (Horvitz-Thompson), so the ratio is a consistent estimate of the full-batch KDE, while
    keeping every class represented. ``importance_weights=False`` reproduces the paper's
    unweighted estimator. For a soft label the class used for balancing is its arg-max.

    Two more readings, each an option. The reference code (JDTLosses, ``kde.py``) draws the key
    points from each image for that image's pixels (``key_scope="image"``; the paper's text says
    per batch, ``"batch"``, the default), and it can allocate them in proportion to the class
    frequencies (its ``biased=True``, here ``key_sampling="proportional"``), which needs no
    weights. ``python benchmarks/paper_recipe.py`` prints the estimates for 8 images of 64 x 64
    pixels, a calibrated network with f = 0.05 at every pixel and Bernoulli(0.05) labels, n_key =
    1024, h = 1e-3 (E[y | f] = 0.050): unweighted balanced key points give 0.500 per batch and
    0.284 per image (an image has about 203 foreground pixels, fewer than its 512 balanced key
    points, which caps the over-representation); importance-weighted 0.050; proportional and
    unweighted 0.050. The paper's recipe (:mod:`probseg.distillation`,
    ``recipe: paper``) uses the unweighted per-image reading; probseg's default stays weighted.

Region
    The paper recalibrates only misclassified pixels (arg-max f != label) and pixels near a
    label boundary; the others keep the network's probabilities (:func:`calibration_region`).
    ``region="all"`` recalibrates every pixel.

Numerics
    Probabilities are clamped to ``[PROB_FLOOR, 1]`` before the logarithm, PROB_FLOOR being the
    smallest normal float32 (about 1.18e-38, log = -87.3) for every dtype, so float32 and float64
    agree and a zero probability gives a finite, very small kernel instead of log 0 = -inf (which
    would turn an all -inf row into NaN). In the softmax, kernel values below exp(-43.7) ~ 1e-19
    (float32; exp(-354) in float64) times the row's largest are raised to that floor: underflowing
    exp and subnormal floats are an order of magnitude slower on CPUs, and the floor moves the
    estimate by less than m * 1e-19 (relative). The kernel is evaluated in float64 when the input is
    float64 and in float32 otherwise (float16 / bfloat16 inputs and autocast regions are upcast;
    autocast is switched off inside), and :func:`kde_calibrate` returns the input's dtype.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from probseg._config import optional_component
from probseg._ops import (
    check_choice,
    check_class_ids,
    check_probabilities,
    check_sums_to_one,
    check_tensor,
    label_boundary,
    shape_of,
)

PROB_FLOOR = torch.finfo(torch.float32).tiny
"""Probabilities are clamped to [PROB_FLOOR, 1] before the logarithm (any dtype)."""

REGIONS = ("boundary", "all")
"""Accepted values of ``region``."""

KEY_SAMPLINGS = ("balanced", "proportional")
"""Accepted values of ``key_sampling``: ceil(n_key / n_unique) key points per present class (the
paper's text), or ceil(n_key * n_c / n) (the class frequencies; the reference code's ``biased``)."""

KEY_SCOPES = ("batch", "image")
"""Accepted values of ``key_scope``: key points drawn from the whole batch (the paper's text) or
from each image for that image's pixels (the reference code)."""

_CHUNK_BYTES = 64 * 2**20
"""Upper bound on the bytes of one (rows, m) block of the kernel matrix (accelerators)."""

_CPU_CHUNK_BYTES = 4 * 2**20
"""The same on CPU, where blocks that stay in cache are about twice as fast as 64 MiB ones."""


# ----------------------------------------------------------------------------- checks


def _check_bandwidth(bandwidth: Any) -> float:
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, numbers.Real):
        hint = " (PyYAML reads 1e-3 as a string: write 1.0e-3)" if isinstance(bandwidth, str) else ""
        raise ValueError(f"bandwidth must be a positive finite number, got {bandwidth!r}{hint}")  # noqa: TRY004
    bandwidth = float(bandwidth)
    if not math.isfinite(bandwidth) or bandwidth <= 0:
        raise ValueError(f"bandwidth must be a positive finite number, got {bandwidth!r}")
    return bandwidth


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half precision is upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on ``device`` (it would run the kernel matmul in half precision)."""
    available = getattr(torch.amp, "is_autocast_available", lambda kind: kind in ("cpu", "cuda"))
    if not available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


# ----------------------------------------------------------------------------- kernels


def _kernel_terms(key_probs: Tensor, bandwidth: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(K, m) coefficients alpha - 1 = f_i / h and the (m,) log normaliser of each key point."""
    coef = key_probs.to(dtype) / bandwidth  # (m, K) = alpha - 1
    const = torch.lgamma(coef.sum(dim=1) + key_probs.shape[1]) - torch.lgamma(coef + 1).sum(dim=1)
    return coef.T, const


def _log_probs(probs: Tensor, dtype: torch.dtype) -> Tensor:
    return probs.to(dtype).clamp(PROB_FLOOR, 1).log()


def dirichlet_log_kernel(probs: Tensor, key_probs: Tensor, bandwidth: float) -> Tensor:
    """Log Dirichlet kernel between evaluation points and kernel centres.

    .. math::

        \\log k_{Dir}(f_j; \\alpha_i) = \\log\\Gamma(\\textstyle\\sum_k \\alpha_{ik})
            - \\sum_k \\log\\Gamma(\\alpha_{ik}) + \\sum_k (\\alpha_{ik} - 1) \\log f_{jk},
        \\qquad \\alpha_i = f_i / h + 1

    (the log density at ``f_j`` of a Dirichlet(alpha_i)), computed as one (n, K) @ (K, m) matrix
    product plus an (m,) constant. ``probs`` is clamped to [PROB_FLOOR, 1] before the log.

    Args:
        probs: (n, K) points f_j at which the densities are evaluated, K >= 2.
        key_probs: (m, K) kernel centres f_i, in [0, 1].
        bandwidth: h > 0.

    Returns:
        (n, m) log kernel values, float64 if an input is float64, else float32.
    """
    bandwidth = _check_bandwidth(bandwidth)
    check_tensor(probs, "probs")
    check_tensor(key_probs, "key_probs")
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"probs must have shape (n, K) with K >= 2, got {shape_of(probs)}")
    if key_probs.ndim != 2 or key_probs.shape[1] != probs.shape[1]:
        raise ValueError(f"key_probs must have shape (m, K) = (m, {probs.shape[1]}), got {shape_of(key_probs)}")
    check_probabilities(probs, "probs")
    check_probabilities(key_probs, "key_probs")
    if probs.device != key_probs.device:
        raise ValueError(f"probs is on {probs.device} and key_probs on {key_probs.device}; use one device")
    dtype = _compute_dtype(probs, key_probs)
    with _no_autocast(probs.device):
        coef, const = _kernel_terms(key_probs, bandwidth, dtype)
        return torch.addmm(const, _log_probs(probs, dtype), coef)


def beta_log_kernel(probs: Tensor, key_probs: Tensor, bandwidth: float) -> Tensor:
    """Log Beta kernel for binary segmentation: the K = 2 Dirichlet kernel on (1 - p, p).

    .. math::

        \\log k_{Beta}(p_j; \\alpha_i, \\beta_i) = \\log \\frac{\\Gamma(\\alpha_i + \\beta_i)}
            {\\Gamma(\\alpha_i)\\Gamma(\\beta_i)} + (\\alpha_i - 1) \\log p_j + (\\beta_i - 1) \\log(1 - p_j),

    with alpha_i = p_i / h + 1 and beta_i = (1 - p_i) / h + 1.

    Args:
        probs: (n,) foreground probabilities p_j at which the densities are evaluated.
        key_probs: (m,) foreground probabilities p_i of the kernel centres.
        bandwidth: h > 0.

    Returns:
        (n, m) log kernel values (see :func:`dirichlet_log_kernel`).
    """
    check_tensor(probs, "probs")
    check_tensor(key_probs, "key_probs")
    if probs.ndim != 1:
        raise ValueError(f"probs must have shape (n,) (foreground probabilities), got {shape_of(probs)}")
    if key_probs.ndim != 1:
        raise ValueError(f"key_probs must have shape (m,) (foreground probabilities), got {shape_of(key_probs)}")
    binary = torch.stack([1 - probs, probs], 1)
    return dirichlet_log_kernel(binary, torch.stack([1 - key_probs, key_probs], 1), bandwidth)


# ----------------------------------------------------------------------------- key points


def sample_key_points(labels: Tensor, n_key: int, generator: torch.Generator | None = None, *,
                      key_sampling: str = "balanced") -> tuple[Tensor, Tensor]:
    """Stratified key points (one stratum per class) and their importance weights.

    ``m_c`` pixels are drawn without replacement from each class c present in ``labels`` (n_c =
    its pixel count, n = the total, ``n_unique`` the classes present); classes absent get none:

    * ``"balanced"`` (the paper's text): ``m_c = min(n_c, ceil(n_key / n_unique))``, so
      ``m = sum_c m_c <= n_key + n_unique - 1``;
    * ``"proportional"`` (the reference code's ``biased=True``): ``m_c = min(n_c, ceil(n_key * n_c / n))``,
      the class frequencies of ``labels`` (every present class gets at least one).

    Args:
        labels: (n,) integer class ids (for soft labels pass their arg-max).
        n_key: requested number of key points, >= 1.
        generator: random source; the same seed gives the same indices. When it lives on another
            device than ``labels`` the permutations are drawn on the generator's device.
        key_sampling: ``"balanced"`` or ``"proportional"`` (:data:`KEY_SAMPLINGS`).

    Returns:
        ``(indices, weights)``: (m,) long indices into ``labels``, grouped by ascending class id,
        and (m,) float32 importance weights ``n_c / m_c`` (>= 1).
    """
    check_tensor(labels, "labels")
    if labels.ndim != 1 or labels.numel() == 0:
        raise ValueError(f"labels must have shape (n,) with n >= 1, got {shape_of(labels)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must hold integer class ids, got dtype {labels.dtype}")
    n_key = _check_int(n_key, "n_key", 1)
    key_sampling = check_choice(key_sampling, "key_sampling", KEY_SAMPLINGS)
    classes, counts = torch.unique(labels, return_counts=True)
    per_class = math.ceil(n_key / classes.numel())
    perm_device = generator.device if generator is not None else labels.device
    indices, weights = [], []
    for c, n_c in zip(classes.tolist(), counts.tolist(), strict=True):
        pos = (labels == c).nonzero().squeeze(1)
        if key_sampling == "proportional":  # integer ceil of n_key * n_c / n, no float rounding
            per_class = -(-n_key * n_c // labels.numel())
        m_c = min(n_c, per_class)
        if m_c < n_c:
            pos = pos[torch.randperm(n_c, generator=generator, device=perm_device)[:m_c].to(labels.device)]
        indices.append(pos)
        weights.append(torch.full((m_c,), n_c / m_c, dtype=torch.float32, device=labels.device))
    return torch.cat(indices), torch.cat(weights)


# ----------------------------------------------------------------------------- estimator


def _rows_per_chunk(m: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows of the (n, m) kernel evaluated at once: at most _CHUNK_BYTES (_CPU_CHUNK_BYTES on CPU)."""
    budget = min(_CHUNK_BYTES, _CPU_CHUNK_BYTES) if device.type == "cpu" else _CHUNK_BYTES
    return max(1, budget // (m * torch.finfo(dtype).bits // 8))


def kde_estimate(
    probs: Tensor, key_probs: Tensor, key_labels: Tensor, bandwidth: float, key_weights: Tensor | None = None
) -> Tensor:
    """Kernel estimate of E[y | f] at ``probs`` from labelled key points.

    .. math::

        \\widehat{E}[y \\mid f_j] = \\sum_i \\mathrm{softmax}_i\\big(\\log k_{Dir}(f_j, f_i) + \\log w_i\\big) \\, y_i

    which is sum_i w_i k(f_j, f_i) y_i / sum_i w_i k(f_j, f_i), computed in log space (a softmax
    over the key points) in chunks of rows, each (rows, m) block bounded by 64 MiB (4 MiB on CPU).

    Args:
        probs: (n, K) class probabilities at which to estimate, K >= 2.
        key_probs: (m, K) class probabilities of the key points.
        key_labels: (m, K) one-hot or soft labels of the key points (rows sum to 1), or (m,)
            integer class ids.
        bandwidth: h > 0.
        key_weights: (m,) positive finite weights w_i (e.g. the importance weights of
            :func:`sample_key_points`); None = all 1.

    Returns:
        (n, K) estimate, rows sum to 1; float64 if an input is float64, else float32.
    """
    bandwidth = _check_bandwidth(bandwidth)
    for x, name in ((probs, "probs"), (key_probs, "key_probs"), (key_labels, "key_labels")):
        check_tensor(x, name)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"probs must have shape (n, K) with K >= 2, got {shape_of(probs)}")
    n, k = probs.shape
    if key_probs.ndim != 2 or key_probs.shape[1] != k or key_probs.shape[0] == 0:
        raise ValueError(f"key_probs must have shape (m, K) = (m, {k}) with m >= 1, got {shape_of(key_probs)}")
    m = key_probs.shape[0]
    if key_labels.ndim == 1 and not key_labels.is_floating_point():
        if key_labels.shape[0] != m:
            raise ValueError(f"key_labels must have shape ({m},) or ({m}, {k}), got {shape_of(key_labels)}")
        check_class_ids(key_labels, k, "key_labels", allow_bool=False)
        key_labels = torch.nn.functional.one_hot(key_labels.long(), k)
    elif key_labels.shape != (m, k):
        raise ValueError(
            f"key_labels must have shape (m, K) = ({m}, {k}) or ({m},) class ids, got {shape_of(key_labels)}"
        )
    else:
        check_probabilities(key_labels, "key_labels")
        check_sums_to_one(key_labels, "key_labels", dim=1)
    check_probabilities(probs, "probs")
    check_probabilities(key_probs, "key_probs")
    tensors = [probs, key_probs, key_labels]
    if key_weights is not None:
        check_tensor(key_weights, "key_weights")
        if key_weights.shape != (m,):
            raise ValueError(f"key_weights must have shape (m,) = ({m},), got {shape_of(key_weights)}")
        if not key_weights.is_floating_point():
            key_weights = key_weights.double()
        if not bool(torch.isfinite(key_weights).all() & (key_weights > 0).all()):
            raise ValueError("key_weights must be positive and finite")
        tensors.append(key_weights)
    if any(t.device != probs.device for t in tensors):
        devices = [str(t.device) for t in tensors]
        raise ValueError(f"probs, key_probs, key_labels and key_weights must be on one device, got {devices}")

    dtype = _compute_dtype(probs, key_probs)
    with _no_autocast(probs.device):
        coef, const = _kernel_terms(key_probs, bandwidth, dtype)
        if key_weights is not None:
            const = const + key_weights.to(dtype).log()
        labels = key_labels.to(dtype)
        out = torch.empty(n, k, dtype=dtype, device=probs.device)
        rows = _rows_per_chunk(m, dtype, probs.device)
        cutoff = 0.5 * math.log(torch.finfo(dtype).tiny)  # -43.7 (float32), -354 (float64)
        for start in range(0, n, rows):
            logk = torch.addmm(const, _log_probs(probs[start : start + rows], dtype), coef)  # (rows, m)
            logk.sub_(logk.amax(dim=1, keepdim=True))  # in place: one (rows, m) buffer
            # Relative kernel values are floored at exp(cutoff) (1e-19 in float32): underflowing
            # exp and subnormal floats make the CPU exp and matmul an order of magnitude slower,
            # and a floor this small moves the estimate by less than m * 1e-19 (relative).
            kern = logk.clamp_min_(cutoff).exp_()
            num = kern @ labels  # (rows, K); sum_k num_k = sum_i kern_i as the label rows sum to 1
            out[start : start + rows] = num / num.sum(dim=1, keepdim=True)  # each entry <= 1 exactly
    return out


# ----------------------------------------------------------------------------- segmentation maps


def calibration_region(probs: Tensor, labels: Tensor, boundary_width: int = 1) -> Tensor:
    """Pixels to recalibrate: misclassified or near a label boundary (the paper's region).

    A pixel is in the region when ``argmax_k probs`` (ties to the lower class id) differs from its
    label, or when a pixel of another label class lies within ``boundary_width`` pixels
    (Chebyshev distance, i.e. in the (2w + 1) x (2w + 1) square around it, clipped at the image
    border). The neighbourhood is computed per image (max-pooling of the one-hot label map), so
    nothing leaks across the images of a batch. ``boundary_width=0`` keeps only the
    misclassified pixels.

    Args:
        probs: (B, K, H, W) class probabilities (or logits: only the arg-max is used).
        labels: (B, H, W) integer class ids in [0, K).
        boundary_width: w >= 0.

    Returns:
        (B, H, W) bool.
    """
    check_tensor(probs, "probs")
    check_tensor(labels, "labels")
    if probs.ndim != 4 or probs.shape[1] < 2:
        raise ValueError(f"probs must have shape (B, K, H, W) with K >= 2, got {shape_of(probs)}")
    b, k, h, w = probs.shape
    if labels.shape != (b, h, w):
        raise ValueError(f"labels must have shape (B, H, W) = {(b, h, w)}, got {shape_of(labels)}")
    boundary_width = _check_int(boundary_width, "boundary_width", 0)
    check_class_ids(labels, k, "labels", allow_bool=False)
    labels = labels.long()
    return (probs.detach().argmax(dim=1) != labels) | label_boundary(labels, k, boundary_width)


def kde_calibrate(
    probs: Tensor,
    target: Tensor,
    bandwidth: float = 1e-3,
    n_key: int = 1024,
    region: str = "boundary",
    boundary_width: int = 1,
    importance_weights: bool = True,
    generator: torch.Generator | None = None,
    *,
    key_sampling: str = "balanced",
    key_scope: str = "batch",
) -> Tensor:
    """Replace a segmentation network's probabilities by the KDE estimate of E[y | f] (see the module doc).

    Key points are drawn from the whole batch (all B * H * W pixels, flattened; ``key_scope=
    "image"``: from each image, for that image's pixels) with :func:`sample_key_points`
    (stratified on the target's class ids, the arg-max for soft targets); the pixels of the region
    are replaced by :func:`kde_estimate`, the others are returned bit-identical. The result is
    detached (no gradient flows through it).

    Args:
        probs: (B, K, H, W) class probabilities (sum to 1 over K), K >= 2.
        target: (B, H, W) integer class ids, or (B, K, H, W) soft labels (sum to 1 over K).
        bandwidth: h > 0 (the paper's best: 1e-3).
        n_key: key points per batch (per image with ``key_scope="image"``), >= 1 (at least one per
            present class is always drawn).
        region: ``"boundary"`` (misclassified or within ``boundary_width`` pixels of another
            label class, :func:`calibration_region`) or ``"all"``.
        boundary_width: Chebyshev radius of the boundary band, >= 0.
        importance_weights: weight key points by n_c / m_c (consistent estimate of the
            full-batch KDE); False = the paper's unweighted estimator.
        generator: random source for the key points.
        key_sampling: ``"balanced"`` (default, the paper's text) or ``"proportional"`` key points
            per class (:func:`sample_key_points`).
        key_scope: ``"batch"`` (default, the paper's text: one set of key points for the batch)
            or ``"image"`` (the reference code: each image's own key points calibrate it).

    Returns:
        (B, K, H, W) probabilities, the dtype of ``probs`` (computed in float64 for float64
        input, else float32).
    """
    bandwidth = _check_bandwidth(bandwidth)
    n_key = _check_int(n_key, "n_key", 1)
    region = check_choice(region, "region", REGIONS)
    boundary_width = _check_int(boundary_width, "boundary_width", 0)
    if not isinstance(importance_weights, bool):
        raise TypeError(f"importance_weights must be a bool, got {importance_weights!r}")
    key_sampling = check_choice(key_sampling, "key_sampling", KEY_SAMPLINGS)
    key_scope = check_choice(key_scope, "key_scope", KEY_SCOPES)
    check_tensor(probs, "probs")
    check_tensor(target, "target")
    if probs.ndim != 4 or probs.shape[1] < 2 or probs.numel() == 0:
        raise ValueError(f"probs must have shape (B, K, H, W) with K >= 2 and no empty axis, got {shape_of(probs)}")
    b, k, h, w = probs.shape
    probs = probs.detach()
    target = target.detach()
    check_probabilities(probs, "probs")
    check_sums_to_one(probs, "probs", dim=1)
    if target.device != probs.device:
        raise ValueError(f"probs is on {probs.device} and target on {target.device}; use one device")
    dtype = _compute_dtype(probs)
    if target.shape == (b, h, w):
        check_class_ids(target, k, "target", allow_bool=False)
        ids = target.long()
        soft = None
    elif target.shape == (b, k, h, w):
        check_probabilities(target, "target")
        check_sums_to_one(target, "target", dim=1)
        ids = target.argmax(dim=1)
        soft = target
    else:
        raise ValueError(
            f"target must have shape (B, H, W) = {(b, h, w)} (class ids) or (B, K, H, W) = {(b, k, h, w)} "
            f"(soft labels), got {shape_of(target)}"
        )

    mask = calibration_region(probs, ids, boundary_width) if region == "boundary" else None
    pixel_probs = probs.permute(0, 2, 3, 1)  # (B, H, W, K) views
    pixel_soft = None if soft is None else soft.permute(0, 2, 3, 1)
    out = probs.clone()
    out_view = out.permute(0, 2, 3, 1)  # shares storage with out
    # One set of key points for the batch, or one per image for that image's pixels.
    for part in [slice(None)] if key_scope == "batch" else [slice(i, i + 1) for i in range(b)]:
        flat_probs = pixel_probs[part].reshape(-1, k)  # (n, K)
        flat_ids = ids[part].reshape(-1)
        key_idx, key_w = sample_key_points(flat_ids, n_key, generator, key_sampling=key_sampling)
        if pixel_soft is None:
            key_labels = torch.nn.functional.one_hot(flat_ids[key_idx], k).to(dtype)
        else:
            key_labels = pixel_soft[part].reshape(-1, k)[key_idx].to(dtype)
        keys = (flat_probs[key_idx], key_labels, bandwidth, key_w if importance_weights else None)
        target_view = out_view[part]  # (B or 1, H, W, K), shares storage with out
        if mask is None:
            target_view.copy_(kde_estimate(flat_probs, *keys).view(target_view.shape))
        elif bool(mask[part].any()):
            target_view[mask[part]] = kde_estimate(target_view[mask[part]], *keys).to(out.dtype)
    return out


# ----------------------------------------------------------------------------- configurable object


class KDECalibration:
    """KDE recalibration as a configurable object (for YAML configs / the Lightning CLI).

    ``KDECalibration(bandwidth, n_key, region, ...)(probs, target)`` is :func:`kde_calibrate` with
    those settings; the arguments are validated at construction.

    Args:
        bandwidth: h > 0 (the paper's best: 1e-3).
        n_key: key points per batch (or image); must be at least the number of classes
            (:meth:`check_num_classes`, also checked on every call).
        region: ``"boundary"`` or ``"all"``.
        boundary_width: Chebyshev radius of the boundary band, >= 0.
        importance_weights: n_c / m_c key-point weights (True, consistent) or the paper's
            unweighted estimator (False).
        key_sampling: ``"balanced"`` (the paper's text) or ``"proportional"`` key points per class.
        key_scope: ``"batch"`` (the paper's text) or ``"image"`` (the reference code).
    """

    OPTIONS = ("bandwidth", "n_key", "region", "boundary_width", "importance_weights", "key_sampling", "key_scope")
    """The constructor's arguments, the keys of a YAML mapping."""

    def __init__(
        self,
        bandwidth: float = 1e-3,
        n_key: int = 1024,
        region: str = "boundary",
        boundary_width: int = 1,
        importance_weights: bool = True,
        key_sampling: str = "balanced",
        key_scope: str = "batch",
    ) -> None:
        self.bandwidth = _check_bandwidth(bandwidth)
        self.n_key = _check_int(n_key, "n_key", 1)
        self.region = check_choice(region, "region", REGIONS)
        self.boundary_width = _check_int(boundary_width, "boundary_width", 0)
        if not isinstance(importance_weights, bool):
            raise TypeError(f"importance_weights must be a bool, got {importance_weights!r}")
        self.importance_weights = importance_weights
        self.key_sampling = check_choice(key_sampling, "key_sampling", KEY_SAMPLINGS)
        self.key_scope = check_choice(key_scope, "key_scope", KEY_SCOPES)

    def check_num_classes(self, num_classes: int) -> None:
        """Raise ValueError when ``n_key`` is smaller than ``num_classes``."""
        if self.n_key < num_classes:
            raise ValueError(
                f"n_key must be at least the number of classes ({num_classes}) so that every class can "
                f"have a key point, got n_key={self.n_key}"
            )

    def __call__(self, probs: Tensor, target: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B, K, H, W) probabilities and (B, H, W) ids or (B, K, H, W) soft labels -> calibrated (B, K, H, W)."""
        check_tensor(probs, "probs")
        if probs.ndim != 4:
            raise ValueError(f"probs must have shape (B, K, H, W), got {shape_of(probs)}")
        self.check_num_classes(probs.shape[1])
        return kde_calibrate(probs, target, generator=generator, **self.options())

    def options(self) -> dict[str, Any]:
        """The settings as constructor keyword arguments."""
        return {name: getattr(self, name) for name in self.OPTIONS}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options().items())})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, KDECalibration):
            return NotImplemented
        return repr(self) == repr(other)

    __hash__ = None  # mutable attributes

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | bool | None) -> KDECalibration | None:
        """None / False -> None (no calibration), True -> the defaults, a dict -> ``cls(**config)``.

        Unknown keys raise ValueError listing the valid ones.
        """
        return optional_component(config, cls, "KDE calibration", cls.OPTIONS)

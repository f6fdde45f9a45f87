"""Gini index of the prior's singular values (Valiuddin et al., eq. 20).

The prior is an axis-aligned Normal, so its singular values are the per-dimension sigmas. With the
sigmas sorted ascending (sigma_1 <= ... <= sigma_L):

.. math:: G(\\sigma) = 1 - 2 \\sum_{k=1}^{L} \\frac{\\sigma_k}{\\|\\sigma\\|_1} \\, \\frac{L - k + 1/2}{L}

Equal sigmas give 0; a single non-zero sigma gives 1 - 1/L. Lower means less collapse.

Which singular values (``of``, :data:`GINI_OF`): the cSAE paper takes "the singular values of the
prior Normal densities ... from the trace of the covariance matrix". The covariance
diag(sigma^2)'s singular values are the variances sigma^2; the scale matrix diag(sigma)'s (the
Normal's square-root covariance, whose columns span the latent directions) are the sigmas. The
default is ``"sigma"``: it is what probseg has always reported, and the sigmas are the
latent's scales in its own units. The Gini of the variances, ``"variance"``, is never smaller
(squaring spreads positive values apart: x^2 / x grows with x), so numbers under the two readings
are not comparable across papers.
"""

from __future__ import annotations

import torch

GINI_OF = ("sigma", "variance")


def singular_values(sigma: torch.Tensor, of: str = "sigma") -> torch.Tensor:
    """The (B, L) values whose Gini index is reported: ``sigma`` itself or its square."""
    if of not in GINI_OF:
        raise ValueError(f"gini_of must be one of {GINI_OF}, got {of!r}")
    return sigma if of == "sigma" else sigma.square()


def gini_index(sigma: torch.Tensor) -> torch.Tensor:
    """Gini index of each row of ``sigma``.

    Args:
        sigma: (B, L) non-negative singular values (prior standard deviations), not all zero.

    Returns:
        (B,) Gini indices in [0, 1 - 1/L].
    """
    if not isinstance(sigma, torch.Tensor) or sigma.ndim != 2:
        raise ValueError(f"sigma must be a (B, L) tensor, got {getattr(sigma, 'shape', type(sigma))}")
    if not sigma.is_floating_point() or not bool(torch.isfinite(sigma).all()):
        raise ValueError("sigma must hold finite floating-point values")
    if bool((sigma < 0).any()):
        raise ValueError("sigma must be non-negative")
    total = sigma.sum(dim=1, keepdim=True)
    if bool((total == 0).any()):
        raise ValueError("a row of sigma is all zeros; the Gini index is undefined")
    length = sigma.shape[1]
    k = torch.arange(1, length + 1, dtype=sigma.dtype, device=sigma.device)
    weight = (length - k + 0.5) / length
    ascending = sigma.sort(dim=1).values / total
    return 1 - 2 * (ascending * weight).sum(dim=1)

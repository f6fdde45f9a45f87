"""Amortized planar normalizing flows (Rezende & Mohamed 2015), as used by 2p-planar
(Valiuddin et al. 2021) and the cSAE ("Retained Singular Values in Probabilistic Image
Segmentation with Normalizing Flows and Optimal Transport").

One planar step maps

.. math::
    f(z) = z + \\hat u \\, \\tanh(w^\\top z + b), \\qquad
    \\log |\\det J_f(z)| = \\log |1 + \\hat u^\\top w \\, (1 - \\tanh^2(w^\\top z + b))|

with :math:`\\hat u = u + (m(w^\\top u) - w^\\top u) \\, w / \\|w\\|^2`,
:math:`m(a) = -1 + \\max(\\log(1 + e^a), \\delta)`, so that :math:`\\hat u^\\top w = m(w^\\top u) \\ge -1 + \\delta`
and f is invertible with :math:`\\det J_f \\ge \\delta`. The floor :math:`\\delta = 10^{-4}` only acts for
:math:`w^\\top u < -9.2`, where softplus would otherwise underflow to 0 in floating point and leave
a singular Jacobian. This is the transform of
pyro's ``ConditionedPlanar`` (its ``u_hat``); pyro's class cannot be used directly because its
log-determinant is only available for the tensor it just produced and it divides by
:math:`\\|w\\|^2`, which is NaN for w = 0. Here the parameters (u, w, b) of every step are predicted
per image from an encoder's features, the division is guarded, and each call returns the sample
with its summed log-determinant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from probseg.layers.gaussian import full_precision


SOFTPLUS_FLOOR = 1e-4
"""delta: u_hat^T w >= -1 + delta, so each step's Jacobian determinant is at least delta."""


def planar_step(
    z: torch.Tensor, u: torch.Tensor, w: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One invertible planar step with per-image parameters.

    Args:
        z: (B, S, L) samples.
        u, w: (B, L) raw parameters; u is reparameterized to u_hat so that u_hat^T w > -1.
        b: (B,) bias.

    ||w||^2 is divided by exactly (so u_hat^T w = m(w^T u) > -1) unless it is below sqrt of the
    dtype's smallest normal number; there w is zero in effect, the correction term is dropped, and
    the step is a translation by u tanh(b) with log-determinant 0 (pyro gives NaN at w = 0).

    Returns:
        f(z) of shape (B, S, L) and log|det J_f(z)| of shape (B, S).
    """
    wu = (w * u).sum(-1, keepdim=True)  # (B, 1)
    norm2 = (w * w).sum(-1, keepdim=True)
    tiny = torch.finfo(w.dtype).tiny ** 0.5
    # The numerator carries w, so the correction is 0 where the denominator is replaced by 1.
    m = F.softplus(wu).clamp_min(SOFTPLUS_FLOOR) - 1
    u_hat = u + (m - wu) * w / torch.where(norm2 > tiny, norm2, torch.ones_like(norm2))
    pre = torch.einsum("bsl,bl->bs", z, w) + b[:, None]  # (B, S)
    act = torch.tanh(pre)
    out = z + u_hat[:, None, :] * act[..., None]
    # 1 + u_hat^T w * tanh'(.) >= delta since u_hat^T w >= -1 + delta and 0 < tanh' <= 1; the clamp
    # is a last guard against rounding.
    uw = (u_hat * w).sum(-1, keepdim=True)  # (B, 1)
    log_det = torch.log((1 + uw * (1 - act * act)).clamp_min(torch.finfo(z.dtype).tiny))
    return out, log_det


class AmortizedPlanarFlow(nn.Module):
    """K planar steps whose (u, w, b) are predicted from per-image encoder features.

    Args:
        feature_dim: size of the encoder features the parameters are predicted from.
        latent_dim: L.
        num_steps: K (the papers use 2).

    Shape:
        features (B, feature_dim), z (B, S, L) or (B, L) -> (z_K, sum of log|det J|) with shapes
        ((B, S, L), (B, S)) or ((B, L), (B,)).
    """

    def __init__(self, feature_dim: int, latent_dim: int, num_steps: int = 2) -> None:
        super().__init__()
        if num_steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {num_steps}")
        self.latent_dim = latent_dim
        self.num_steps = num_steps
        self.params = nn.Linear(feature_dim, num_steps * (2 * latent_dim + 1))

    def step_parameters(self, features: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(u, w, b) of every step: (B, L), (B, L), (B,)."""
        raw = self.params(features).unflatten(-1, (self.num_steps, 2 * self.latent_dim + 1))
        l = self.latent_dim
        return [(raw[:, k, :l], raw[:, k, l : 2 * l], raw[:, k, 2 * l]) for k in range(self.num_steps)]

    def forward(self, features: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        single = z.ndim == 2
        if single:
            z = z.unsqueeze(1)
        if z.ndim != 3 or z.shape[0] != features.shape[0] or z.shape[-1] != self.latent_dim:
            raise ValueError(
                f"expected z of shape (B, {self.latent_dim}) or (B, S, {self.latent_dim}) with "
                f"B={features.shape[0]}, got {tuple(z.shape)}"
            )
        # Flow steps and their log-determinants in float32, also under mixed precision.
        z, features = full_precision(z), full_precision(features)
        with torch.autocast(device_type=z.device.type, enabled=False):
            total = z.new_zeros(z.shape[:2])
            for u, w, b in self.step_parameters(features):
                z, log_det = planar_step(z, u, w, b)
                total = total + log_det
        return (z.squeeze(1), total.squeeze(1)) if single else (z, total)

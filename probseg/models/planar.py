"""2p-planar: the Probabilistic U-Net with a planar flow on the posterior.

Valiuddin et al. 2021, "Improving Aleatoric Uncertainty Quantification in Multi-Annotated Medical
Image Segmentation with Normalizing Flows"; compared in Valiuddin et al., "Retained Singular
Values in Probabilistic Image Segmentation with Normalizing Flows and Optimal Transport".

The posterior sample z_0 ~ q_0(z|x,y) is pushed through K planar steps whose parameters are
amortized from the posterior encoder's features. The KL between the flowed posterior q_K and the
prior has no closed form and is estimated by Monte Carlo over M samples:

.. math::
    \\mathrm{KL}(q_K \\,\\|\\, p) \\approx \\frac{1}{M} \\sum_{m}
        \\Big[\\log q_0(z_0^m) - \\sum_k \\log|\\det J_k(z_{k-1}^m)| - \\log p(z_K^m)\\Big]

Hypotheses at test time come from the prior, as in the PU-Net.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributions import Independent

from probseg.layers import AmortizedPlanarFlow
from probseg.layers.gaussian import sample_set
from probseg.models.punet import ProbUNet
from probseg.models.registry import register_model


def monte_carlo_kl(
    base: Independent, z0: torch.Tensor, log_det: torch.Tensor, z_k: torch.Tensor, prior: Independent
) -> torch.Tensor:
    """KL(q_K || p) per image from M flowed samples: mean of log q0(z0) - log|det J| - log p(zK).

    Args:
        base: q_0, batch (B,), event (L,).
        z0: (B, M, L) samples of q_0.
        log_det: (B, M) summed log|det J| of the flow at z0.
        z_k: (B, M, L) flowed samples.
        prior: p, batch (B,), event (L,).

    Returns:
        (B,) estimates.
    """
    # log_prob broadcasts a (M, B, L) value against batch (B,): move the set axis first.
    log_q0 = base.log_prob(z0.transpose(0, 1)).transpose(0, 1)
    log_p = prior.log_prob(z_k.transpose(0, 1)).transpose(0, 1)
    return (log_q0 - log_det - log_p).mean(1)


def monte_carlo_kl_per_dim(
    base: Independent, z0: torch.Tensor, log_det: torch.Tensor, z_k: torch.Tensor, prior: Independent
) -> torch.Tensor:
    """The estimate of :func:`monte_carlo_kl` shared out over the L latent dimensions, (B, L).

    A convention, not the KL of any one dimension: log q0(z0_d) and log p(zK_d) are the
    axis-aligned densities' own terms, but a planar step mixes the dimensions, so its log|det J|
    is shared out evenly (log_det / L each). The rows sum to :func:`monte_carlo_kl`. Used for the
    per-dimension diagnostics and the free-bits floor; with few Monte Carlo samples an entry can
    be negative, and the floor then acts on a noisy estimate.
    """
    log_q0 = base.base_dist.log_prob(z0.transpose(0, 1)).transpose(0, 1)  # (B, M, L)
    log_p = prior.base_dist.log_prob(z_k.transpose(0, 1)).transpose(0, 1)
    return (log_q0 - log_det.unsqueeze(-1) / z0.shape[-1] - log_p).mean(1)


@register_model("planar")
class PlanarProbUNet(ProbUNet):
    """2p-planar (registry name ``"planar"``): PU-Net whose posterior is a K-step planar flow.

    Args:
        flow_steps: K planar steps on the posterior (the paper: 2).
        kl_samples: M, Monte Carlo samples of the KL estimate.
        kl_warmup_steps, free_bits: posterior-collapse remedies, as in :class:`ProbUNet` (free
            bits floor :func:`monte_carlo_kl_per_dim`).
        (other arguments, including ``teacher`` and ``distillation``, as in :class:`ProbUNet`)

    Loss terms: ``rec_<component>`` (the reconstruction from the first flowed posterior sample;
    by default ``rec_ce``, cross-entropy summed over pixels, mean over batch) and ``kl``
    (beta * Monte Carlo KL(q_K || p)).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        num_filters: list[int] = [32, 64, 128, 192],  # noqa: B006
        convs_per_block: int = 3,
        latent_dim: int = 6,
        fcomb_layers: int = 4,
        beta: float = 1.0,
        flow_steps: int = 2,
        kl_samples: int = 1,
        kl_warmup_steps: int = 0,
        free_bits: float = 0.0,
        fusion: str = "random",
        label_smoothing: float = 0.1,
        reconstruction: dict[str, float] | None = None,
        loss_options: dict[str, Any] | None = None,
        lr: float = 1e-4,
        weight_decay: float = 5e-5,
        num_predict_samples: int = 16,
        teacher: str | None = None,
        distillation: dict[str, Any] | None = None,
    ) -> None:
        if kl_samples < 1:
            raise ValueError(f"kl_samples must be at least 1, got {kl_samples}")
        super().__init__(in_channels, num_classes, num_filters, convs_per_block, latent_dim, fcomb_layers, beta,
                         kl_warmup_steps=kl_warmup_steps, free_bits=free_bits,
                         fusion=fusion, label_smoothing=label_smoothing,
                         reconstruction=reconstruction, loss_options=loss_options, teacher=teacher,
                         distillation=distillation, lr=lr, weight_decay=weight_decay,
                         num_predict_samples=num_predict_samples)
        self.save_hyperparameters()
        self.kl_samples = kl_samples
        self.posterior_flow = AmortizedPlanarFlow(self.posterior.feature_dim, latent_dim, flow_steps)

    def loss_terms(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        images, target, features, q_features = self.encode_batch(batch, generator)
        base = self.posterior.distribution(q_features)
        prior = self.prior(images)
        z0 = sample_set(base, self.kl_samples, generator)  # (B, M, L)
        z_k, log_det = self.posterior_flow(q_features, z0)
        logits = self.fcomb(features, z_k[:, 0])
        kl = self.kl_terms(monte_carlo_kl(base, z0, log_det, z_k, prior),
                           monte_carlo_kl_per_dim(base, z0, log_det, z_k, prior))
        return self.combine_terms(self.reconstruction_terms(logits, target), kl)

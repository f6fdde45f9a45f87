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

from probseg.layers import AmortizedPlanarFlow
from probseg.layers.gaussian import sample_set
from probseg.models.network import NetworkOutput
from probseg.models.objectives import monte_carlo_kl, monte_carlo_kl_per_dim
from probseg.models.punet import ProbUNet, ProbUNetNetwork
from probseg.models.registry import register_model

__all__ = ["PlanarProbUNet", "PlanarProbUNetNetwork", "monte_carlo_kl", "monte_carlo_kl_per_dim"]


class PlanarProbUNetNetwork(ProbUNetNetwork):
    """The PU-Net's parts plus a K-step planar flow on the posterior, amortized from the
    posterior encoder's features.

    Forward outputs: ``logits`` (from the first flowed posterior sample), ``posterior`` (the base
    q_0), ``prior``, and ``posterior_flow = (z0, log_det, z_k)``: M base samples (B, M, L), their
    summed log|det J| (B, M) and the flowed samples (B, M, L), for the Monte Carlo KL; ``features``
    (the U-Net's, as in :class:`~probseg.models.punet.ProbUNetNetwork`).

    Arguments as in :class:`~probseg.models.punet.ProbUNetNetwork` (``generator_args``: its
    ``generator`` and ``generator_options``), plus ``flow_steps`` and ``kl_samples`` of
    :class:`PlanarProbUNet`.
    """

    def __init__(self, in_channels: int, num_classes: int, num_filters: list[int], convs_per_block: int,
                 latent_dim: int, fcomb_layers: int, flow_steps: int, kl_samples: int,
                 **generator_args: Any) -> None:
        super().__init__(in_channels, num_classes, num_filters, convs_per_block, latent_dim, fcomb_layers,
                         **generator_args)
        self.kl_samples = kl_samples
        self.posterior_flow = AmortizedPlanarFlow(self.posterior.feature_dim, latent_dim, flow_steps)

    def forward(self, batch: dict[str, Any], target: torch.Tensor,
                generator: torch.Generator | None = None) -> NetworkOutput:
        images, features, q_features = self.encode(batch, target)
        base = self.posterior.distribution(q_features)
        prior = self.prior(images)
        z0 = sample_set(base, self.kl_samples, generator)  # (B, M, L)
        z_k, log_det = self.posterior_flow(q_features, z0)
        return {"logits": self.fcomb(features, z_k[:, 0]), "posterior": base, "prior": prior,
                "posterior_flow": (z0, log_det, z_k), "features": features}


@register_model("planar")
class PlanarProbUNet(ProbUNet):
    """2p-planar (registry name ``"planar"``): PU-Net whose posterior is a K-step planar flow.

    Args:
        flow_steps: K planar steps on the posterior (the paper: 2).
        kl_samples: M, Monte Carlo samples of the KL estimate.
        **kwargs: the arguments of :class:`ProbUNet` (``kl_warmup_steps`` and ``free_bits``
            included: free bits floor :func:`monte_carlo_kl_per_dim`) and the shared options.

    Loss terms: ``rec_<component>`` (the reconstruction from the first flowed posterior sample;
    by default ``rec_ce``, cross-entropy summed over pixels, mean over batch) and ``kl``
    (beta * Monte Carlo KL(q_K || p)).
    """

    def __init__(self, *, flow_steps: int = 2, kl_samples: int = 1, **kwargs: Any) -> None:
        if kl_samples < 1:
            raise ValueError(f"kl_samples must be at least 1, got {kl_samples}")
        super().__init__(**kwargs)

    def build_network(self) -> PlanarProbUNetNetwork:
        hp = self.hparams
        return PlanarProbUNetNetwork(self.in_channels, self.num_classes, hp.num_filters, hp.convs_per_block,
                                     hp.latent_dim, hp.fcomb_layers, hp.flow_steps, hp.kl_samples,
                                     **self.generator_arguments())

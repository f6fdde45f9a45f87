"""cSAE: the conditional Sinkhorn autoencoder.

Valiuddin et al., "Retained Singular Values in Probabilistic Image Segmentation with Normalizing
Flows and Optimal Transport". Planar-flow projector heads sit on BOTH the prior and the posterior,
each amortized from its own encoder. Training minimizes (eq. 12)

.. math::
    \\mathrm{CE}(y, G(x, z_K^q)) + \\beta \\, \\mathrm{KL}(\\mathcal N_q \\,\\|\\, \\mathcal N_p)
    + \\gamma \\, S_\\varepsilon(\\hat Q_Z, \\hat P_Z)

with the KL in closed form between the BASE Normals, and S_eps a GeomLoss Sinkhorn divergence
between N_OT flowed posterior samples and N_OT flowed prior samples of the SAME image (one
(N_OT, L) point cloud pair per image, batched as (B, N_OT, L)). At test time the flows are
discarded: hypotheses decode samples of the base prior.

GeomLoss's gradients are approximate (envelope theorem), so the Sinkhorn term is never
gradchecked.
"""

from __future__ import annotations

from typing import Any

import torch

from probseg.layers import AmortizedPlanarFlow
from probseg.layers.gaussian import Generators, sample_set
from probseg.models.punet import ProbUNet
from probseg.models.registry import register_model


def sinkhorn_divergence(
    x: torch.Tensor, y: torch.Tensor, blur: float = 0.05, diameter: float | None = 100.0, scaling: float = 0.5
) -> torch.Tensor:
    """Per-image Sinkhorn divergence S_eps between point clouds, GeomLoss with p = 2.

    GeomLoss's p = 2 ground cost is |x - y|^2 / 2, so for a small blur S approaches half the squared
    2-Wasserstein distance. Computed in float32 whatever the input precision.

    Args:
        x, y: (B, N, L) and (B, M, L) point clouds, uniform weights; image b of x is only compared
            with image b of y.
        blur, diameter, scaling: GeomLoss's ``SamplesLoss`` settings (eps = blur ** p).

    Returns:
        (B,) divergences.
    """
    from geomloss import SamplesLoss

    if x.ndim != 3 or y.ndim != 3 or x.shape[0] != y.shape[0] or x.shape[-1] != y.shape[-1]:
        raise ValueError(f"expected point clouds (B, N, L) and (B, M, L), got {tuple(x.shape)} and {tuple(y.shape)}")
    loss = SamplesLoss("sinkhorn", p=2, blur=blur, diameter=diameter, scaling=scaling, backend="tensorized")
    with torch.autocast(device_type=x.device.type, enabled=False):  # float32 under mixed precision too
        return loss(x.float(), y.float())


@register_model("csae")
class ConditionalSinkhornAutoencoder(ProbUNet):
    """cSAE (registry name ``"csae"``).

    Args:
        beta: weight of the analytic KL between the base Normals (paper: 10).
        gamma: weight of the Sinkhorn divergence (paper: 1 or 10).
        flow_steps: K planar steps of each projector head (paper: 2).
        num_ot_samples: N_OT flowed samples per image and distribution (paper: 16).
        sinkhorn_blur, sinkhorn_diameter, sinkhorn_scaling: GeomLoss settings (paper: p = 2,
            diameter 100, GeomLoss defaults otherwise: blur 0.05, scaling 0.5).
        sample_through_prior_flow: draw test-time hypotheses through the prior flow instead of
            from the base prior (the paper discards the flows; this is for comparison).
        (other arguments, including ``teacher`` and ``distillation``, as in :class:`ProbUNet`)

    Loss terms: ``rec_<component>`` (by default ``rec_ce``), ``kl`` (beta-weighted) and
    ``sinkhorn`` (gamma-weighted), batch means.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        num_filters: list[int] = [32, 64, 128, 192],  # noqa: B006
        convs_per_block: int = 3,
        latent_dim: int = 6,
        fcomb_layers: int = 4,
        beta: float = 10.0,
        gamma: float = 10.0,
        flow_steps: int = 2,
        num_ot_samples: int = 16,
        sinkhorn_blur: float = 0.05,
        sinkhorn_diameter: float = 100.0,
        sinkhorn_scaling: float = 0.5,
        sample_through_prior_flow: bool = False,
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
        if gamma < 0:
            raise ValueError(f"gamma must be non-negative, got {gamma}")
        if num_ot_samples < 1:
            raise ValueError(f"num_ot_samples (N_OT) must be at least 1, got {num_ot_samples}")
        if sinkhorn_blur <= 0 or not 0 < sinkhorn_scaling < 1:
            raise ValueError(
                f"sinkhorn_blur must be positive and sinkhorn_scaling in (0, 1), got {sinkhorn_blur} and {sinkhorn_scaling}"
            )
        super().__init__(in_channels, num_classes, num_filters, convs_per_block, latent_dim, fcomb_layers, beta,
                         fusion=fusion, label_smoothing=label_smoothing,
                         reconstruction=reconstruction, loss_options=loss_options, teacher=teacher,
                         distillation=distillation, lr=lr, weight_decay=weight_decay,
                         num_predict_samples=num_predict_samples)
        self.save_hyperparameters()
        self.gamma = gamma
        self.num_ot_samples = num_ot_samples
        self.sample_through_prior_flow = sample_through_prior_flow
        self.prior_flow = AmortizedPlanarFlow(self.prior.feature_dim, latent_dim, flow_steps)
        self.posterior_flow = AmortizedPlanarFlow(self.posterior.feature_dim, latent_dim, flow_steps)

    def loss_terms(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        hp = self.hparams
        images, target, features, q_features = self.encode_batch(batch, generator)
        p_features = self.prior.encode(images)
        posterior = self.posterior.distribution(q_features)
        prior = self.prior.distribution(p_features)
        # One draw set per distribution: the first flowed posterior sample reconstructs, all N_OT
        # samples of each side enter the Sinkhorn divergence of their own image.
        zq, _ = self.posterior_flow(q_features, sample_set(posterior, self.num_ot_samples, generator))
        zp, _ = self.prior_flow(p_features, sample_set(prior, self.num_ot_samples, generator))
        logits = self.fcomb(features, zq[:, 0])
        sinkhorn = sinkhorn_divergence(zq, zp, hp.sinkhorn_blur, hp.sinkhorn_diameter, hp.sinkhorn_scaling)
        return {
            **self.reconstruction_terms(logits, target),
            "kl": self.beta * self.kl(posterior, prior).mean(),
            "sinkhorn": self.gamma * sinkhorn.mean(),
        }

    def sample(
        self, images: torch.Tensor, num_samples: int = 16, generator: Generators = None
    ) -> torch.Tensor:
        if not self.sample_through_prior_flow:
            return super().sample(images, num_samples, generator)
        features = self.unet(images)
        p_features = self.prior.encode(images)
        z, _ = self.prior_flow(p_features, sample_set(self.prior.distribution(p_features), num_samples, generator))
        return self.fcomb(features, z)

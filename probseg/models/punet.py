"""Probabilistic U-Net.

Kohl et al. 2018, "A Probabilistic U-Net for Segmentation of Ambiguous Images", NeurIPS.

A U-Net generator, an axis-aligned Gaussian prior p(z|x) and posterior q(z|x,y), and a combiner
that tiles z over the U-Net's last feature map. Training maximizes the ELBO

.. math::
    \\mathcal{L} = \\mathbb{E}_{z \\sim q(z|x,y)}[\\mathrm{CE}(y, f(x, z))]
                 + \\beta \\, \\mathrm{KL}(q(z|x,y) \\,\\|\\, p(z|x))

with the cross-entropy summed over pixels and both terms averaged over the batch, and the KL in
closed form. Hypotheses at test time decode z ~ p(z|x); the U-Net runs once per image.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributions import Independent, kl_divergence

from probseg.layers import Combiner, PosteriorEncoder, PriorEncoder, UNet
from probseg.layers.gaussian import Generators, sample_set
from probseg.models.base import ProbSegModel
from probseg.models.registry import register_model


@register_model("punet")
class ProbUNet(ProbSegModel):
    """Probabilistic U-Net (registry name ``"punet"``).

    Args:
        in_channels: image channels C.
        num_classes: K (binary = 2).
        num_filters: U-Net and encoder channels per level (Kohl et al.: [32, 64, 128, 192]).
        convs_per_block: 3x3 convolutions per level (Kohl et al.: 3).
        latent_dim: L (Kohl et al. and the cSAE paper: 6).
        fcomb_layers: 1x1 convolutions of the combiner (Kohl et al.: 4).
        beta: weight of the KL term.
        fusion, label_smoothing, reconstruction, loss_options: the training target and the
            reconstruction loss (default: one random rater, cross-entropy); see :class:`ProbSegModel`.
        teacher, distillation: knowledge distillation (see :mod:`probseg.distillation`).
        lr, weight_decay, num_predict_samples: see :class:`ProbSegModel`.

    Loss terms: ``rec_<component>`` (by default ``rec_ce``: cross-entropy, sum over pixels, mean
    over batch) and ``kl`` (beta * analytic KL(q || p), mean over batch).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        num_filters: list[int] = [32, 64, 128, 192],  # noqa: B006 (plain list for YAML and hparams)
        convs_per_block: int = 3,
        latent_dim: int = 6,
        fcomb_layers: int = 4,
        beta: float = 1.0,
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
        super().__init__(in_channels, num_classes, lr, weight_decay, num_predict_samples, fusion=fusion,
                         label_smoothing=label_smoothing, reconstruction=reconstruction, loss_options=loss_options,
                         teacher=teacher, distillation=distillation)
        self.save_hyperparameters()
        if beta < 0:
            raise ValueError(f"beta must be non-negative, got {beta}")
        num_filters = list(num_filters)
        self.beta = beta
        self.unet = UNet(in_channels, num_filters, convs_per_block)
        self.prior = PriorEncoder(in_channels, num_filters, convs_per_block, latent_dim)
        self.posterior = PosteriorEncoder(in_channels, num_classes, num_filters, convs_per_block, latent_dim)
        self.fcomb = Combiner(num_filters[0], latent_dim, num_classes, fcomb_layers)

    def kl(self, posterior: Independent, prior: Independent) -> torch.Tensor:
        """KL(q || p) per image, (B,), in closed form."""
        return kl_divergence(posterior, prior)

    def encode_batch(
        self, batch: dict[str, Any], generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """What every training step starts from: images, the fused target ((B, H, W) class ids or
        (B, K, H, W) probabilities), the U-Net features (B, F, H, W) and the posterior encoder's
        features (B, feature_dim)."""
        images = batch["image"]
        target = self.training_target(batch, generator)
        return images, target, self.unet(images), self.posterior.features(images, target)

    def loss_terms(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        images, target, features, q_features = self.encode_batch(batch, generator)
        posterior = self.posterior.distribution(q_features)
        prior = self.prior(images)
        z = sample_set(posterior, 1, generator)[:, 0]  # reparameterized: gradients reach q
        logits = self.fcomb(features, z)
        return {**self.reconstruction_terms(logits, target), "kl": self.beta * self.kl(posterior, prior).mean()}

    def prior_sigmas(self, images: torch.Tensor) -> torch.Tensor:
        """The prior is axis-aligned, so its singular values are its standard deviations (B, L)."""
        return self.prior(images).base_dist.scale

    def sample(
        self, images: torch.Tensor, num_samples: int = 16, generator: Generators = None
    ) -> torch.Tensor:
        features = self.unet(images)
        z = sample_set(self.prior(images), num_samples, generator)
        return self.fcomb(features, z)

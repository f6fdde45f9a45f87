"""Probabilistic U-Net.

Kohl et al. 2018, "A Probabilistic U-Net for Segmentation of Ambiguous Images", NeurIPS.

A U-Net generator, an axis-aligned Gaussian prior p(z|x) and posterior q(z|x,y), and a combiner
that tiles z over the U-Net's last feature map. Training maximizes the ELBO

.. math::
    \\mathcal{L} = \\mathbb{E}_{z \\sim q(z|x,y)}[\\mathrm{CE}(y, f(x, z))]
                 + \\beta \\, \\mathrm{KL}(q(z|x,y) \\,\\|\\, p(z|x))

with the cross-entropy summed over pixels and both terms averaged over the batch, and the KL in
closed form. Hypotheses at test time decode z ~ p(z|x); the U-Net runs once per image.

Two optional remedies against posterior collapse (off by default), shared by every latent model
of the zoo (2p-planar and cSAE inherit them):

* KL warm-up (Bowman et al. 2016, "Generating Sentences from a Continuous Space"): the KL weight
  grows linearly from 0 to beta over the first ``kl_warmup_steps`` training steps;
* free bits (Kingma et al. 2016, "Improved Variational Inference with Inverse Autoregressive
  Flow", eq. 15): the KL term becomes

  .. math::
      \\beta \\sum_{d=1}^{L} \\max\\big(\\lambda, \\tfrac{1}{B} \\textstyle\\sum_b \\mathrm{KL}_{b,d}\\big)

  so a latent dimension whose batch-mean KL is below lambda nats gets no gradient pulling it onto
  the prior.

The KL per latent dimension (batch mean, unweighted) is logged as ``kl_dim<d>``, so collapse
(every dimension near 0) is visible on the dashboard next to the total.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributions import Independent, kl_divergence

from probseg.layers import Combiner, PosteriorEncoder, PriorEncoder, UNet
from probseg.layers.gaussian import Generators, sample_set
from probseg.models.base import LossTerms, ProbSegModel
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
        kl_warmup_steps: anneal the KL weight linearly from 0 to ``beta`` over this many training
            steps (0: no warm-up). Validation and test always use ``beta``.
        free_bits: lambda, a floor in nats on the batch-mean KL of each latent dimension
            (0: off); see the module docstring.
        fusion, label_smoothing, reconstruction, loss_options: the training target and the
            reconstruction loss (default: one random rater, cross-entropy); see :class:`ProbSegModel`.
        teacher, distillation: knowledge distillation (see :mod:`probseg.distillation`).
        lr, weight_decay, num_predict_samples: see :class:`ProbSegModel`.

    Loss terms: ``rec_<component>`` (by default ``rec_ce``: cross-entropy, sum over pixels, mean
    over batch) and ``kl`` (beta * analytic KL(q || p), mean over batch). Diagnostics:
    ``kl_dim<d>`` (unweighted KL per latent dimension, batch mean) and, with a warm-up,
    ``kl_weight``.
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
        super().__init__(in_channels, num_classes, lr, weight_decay, num_predict_samples, fusion=fusion,
                         label_smoothing=label_smoothing, reconstruction=reconstruction, loss_options=loss_options,
                         teacher=teacher, distillation=distillation)
        self.save_hyperparameters()
        if beta < 0:
            raise ValueError(f"beta must be non-negative, got {beta}")
        if kl_warmup_steps < 0:
            raise ValueError(f"kl_warmup_steps must be non-negative, got {kl_warmup_steps}")
        if free_bits < 0:
            raise ValueError(f"free_bits must be non-negative (nats per latent dimension), got {free_bits}")
        num_filters = list(num_filters)
        self.beta = beta
        self.kl_warmup_steps = kl_warmup_steps
        self.free_bits = free_bits
        self.unet = UNet(in_channels, num_filters, convs_per_block)
        self.prior = PriorEncoder(in_channels, num_filters, convs_per_block, latent_dim)
        self.posterior = PosteriorEncoder(in_channels, num_classes, num_filters, convs_per_block, latent_dim)
        self.fcomb = Combiner(num_filters[0], latent_dim, num_classes, fcomb_layers)

    def kl(self, posterior: Independent, prior: Independent) -> torch.Tensor:
        """KL(q || p) per image, (B,), in closed form."""
        return kl_divergence(posterior, prior)

    def kl_per_dim(self, posterior: Independent, prior: Independent) -> torch.Tensor:
        """KL(q_d || p_d) per image and latent dimension, (B, L), in closed form (the Normals are
        axis-aligned, so the KL is the sum of these over d)."""
        return kl_divergence(posterior.base_dist, prior.base_dist)

    def kl_weight(self) -> float:
        """The KL weight of this step: ``beta * min(1, step / kl_warmup_steps)`` in training with a
        warm-up, ``beta`` otherwise (validation, test, or no warm-up)."""
        if not self.training or self.kl_warmup_steps == 0:
            return self.beta
        return self.beta * min(1.0, self.global_step / self.kl_warmup_steps)

    def kl_terms(self, per_image: torch.Tensor, per_dim: torch.Tensor) -> LossTerms:
        """The weighted ``kl`` term and its diagnostics.

        Args:
            per_image: (B,) KL estimate per image (the loss without free bits).
            per_dim: (B, L) the same split over latent dimensions (its sum over L is ``per_image``);
                the free-bits floor applies to its batch mean per dimension.
        """
        weight = self.kl_weight()
        dims = per_dim.mean(0)
        if self.free_bits > 0:
            kl = weight * dims.clamp_min(self.free_bits).sum()
        else:
            kl = weight * per_image.mean()
        diagnostics = {f"kl_dim{d}": value for d, value in enumerate(dims.detach().unbind())}
        if self.kl_warmup_steps and self.training:  # outside training the weight is beta
            diagnostics["kl_weight"] = torch.tensor(weight, device=per_image.device)
        return LossTerms({"kl": kl}, diagnostics)

    def combine_terms(self, reconstruction: dict[str, torch.Tensor], kl: LossTerms,
                      **others: torch.Tensor) -> LossTerms:
        """Reconstruction terms, the ``kl`` terms (with their diagnostics) and any other terms."""
        return LossTerms({**reconstruction, **kl, **others}, kl.diagnostics)

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
        kl = self.kl_terms(self.kl(posterior, prior), self.kl_per_dim(posterior, prior))
        return self.combine_terms(self.reconstruction_terms(logits, target), kl)

    def prior_sigmas(self, images: torch.Tensor) -> torch.Tensor:
        """The prior is axis-aligned, so its singular values are its standard deviations (B, L)."""
        return self.prior(images).base_dist.scale

    def sample(
        self, images: torch.Tensor, num_samples: int = 16, generator: Generators = None
    ) -> torch.Tensor:
        features = self.unet(images)
        z = sample_set(self.prior(images), num_samples, generator)
        return self.fcomb(features, z)

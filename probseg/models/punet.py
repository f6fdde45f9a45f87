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

from probseg.layers import Combiner, PosteriorEncoder, PriorEncoder, build_generator
from probseg.layers.generators import without_weights_file
from probseg.layers.gaussian import Generators, sample_set
from probseg.models.base import ProbSegModel
from probseg.models.network import Network, NetworkOutput, log_mean_softmax
from probseg.models.objectives import KLDivergence
from probseg.models.registry import register_model


class ProbUNetNetwork(Network):
    """The PU-Net's parts: U-Net, prior and posterior encoders, combiner.

    Args:
        in_channels, num_classes, num_filters, convs_per_block, latent_dim, fcomb_layers: as in
            :class:`ProbUNet` (``num_filters`` and ``convs_per_block`` also size the prior and
            posterior encoders, whatever the generator).
        generator, generator_options: the encoder-decoder, see
            :func:`~probseg.layers.generators.build_generator`.

    Forward outputs: ``logits`` (from one reparameterized posterior sample), ``posterior`` and
    ``prior`` (axis-aligned Normals, batch (B,), event (L,)) and ``features``, the U-Net's last
    feature map (B, F, H, W), from which :meth:`predictive_log_probabilities` draws this step's
    prior hypotheses without running the U-Net again.
    """

    def __init__(self, in_channels: int, num_classes: int, num_filters: list[int], convs_per_block: int,
                 latent_dim: int, fcomb_layers: int, generator: str = "unet",
                 generator_options: dict[str, Any] | None = None) -> None:
        super().__init__()
        num_filters = list(num_filters)
        self.unet = build_generator(in_channels, num_filters, convs_per_block, generator, generator_options)
        self.prior = PriorEncoder(in_channels, num_filters, convs_per_block, latent_dim)
        self.posterior = PosteriorEncoder(in_channels, num_classes, num_filters, convs_per_block, latent_dim)
        self.fcomb = Combiner(self.unet.out_channels, latent_dim, num_classes, fcomb_layers)

    def encode(self, batch: dict[str, Any], target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What every training pass starts from: images, the U-Net features (B, F, H, W) and the
        posterior encoder's features of the target (B, feature_dim)."""
        images = batch["image"]
        return images, self.unet(images), self.posterior.features(images, target)

    def forward(self, batch: dict[str, Any], target: torch.Tensor,
                generator: torch.Generator | None = None) -> NetworkOutput:
        images, features, q_features = self.encode(batch, target)
        posterior = self.posterior.distribution(q_features)
        prior = self.prior(images)
        z = sample_set(posterior, 1, generator)[:, 0]  # reparameterized: gradients reach q
        return {"logits": self.fcomb(features, z), "posterior": posterior, "prior": prior, "features": features}

    def prior_sigmas(self, images: torch.Tensor) -> torch.Tensor:
        """The prior is axis-aligned, so its singular values are its standard deviations (B, L)."""
        return self.prior(images).base_dist.scale

    def prior_parts(self, images: torch.Tensor) -> NetworkOutput:
        """What hypotheses start from: ``features`` (the U-Net's, (B, F, H, W)) and ``prior``, the
        keys of the same name in the :meth:`forward` outputs."""
        return {"features": self.unet(images), "prior": self.prior(images)}

    def decode_prior(self, parts: NetworkOutput, num_samples: int, generator: Generators = None) -> torch.Tensor:
        """S hypotheses from :meth:`prior_parts` (or a forward pass's outputs): reparameterized
        prior draws, each decoded by the combiner only.

        Returns:
            (B, S, K, H, W) logits.
        """
        return self.fcomb(parts["features"], sample_set(parts["prior"], num_samples, generator))

    def sample(self, images: torch.Tensor, num_samples: int = 16, generator: Generators = None) -> torch.Tensor:
        return self.decode_prior(self.prior_parts(images), num_samples, generator)

    def predictive_log_probabilities(self, images: torch.Tensor, num_samples: int = 16, generator: Generators = None,
                                     outputs: NetworkOutput | None = None) -> torch.Tensor:
        """As :meth:`Network.predictive_log_probabilities`; with this step's forward ``outputs``
        the hypotheses decode its U-Net features and prior (the combiner runs S times, the U-Net
        and the prior encoder not again). The same draws and values as without them."""
        if outputs is None or "features" not in outputs:
            return super().predictive_log_probabilities(images, num_samples, generator)
        return log_mean_softmax(self.decode_prior(outputs, num_samples, generator))


@register_model("punet")
class ProbUNet(ProbSegModel):
    """Probabilistic U-Net (registry name ``"punet"``).

    Args:
        num_filters: U-Net and encoder channels per level (Kohl et al.: [32, 64, 128, 192]).
        convs_per_block: 3x3 convolutions per level (Kohl et al.: 3).
        latent_dim: L (Kohl et al. and the cSAE paper: 6).
        fcomb_layers: 1x1 convolutions of the combiner (Kohl et al.: 4).
        beta: weight of the KL term.
        kl_warmup_steps: anneal the KL weight linearly from 0 to ``beta`` over this many training
            steps (0: no warm-up). Validation and test always use ``beta``.
        free_bits: lambda, a floor in nats on the batch-mean KL of each latent dimension
            (0: off); see the module docstring.
        generator, generator_options: the encoder-decoder: ``"unet"`` (the zoo's, sized by
            ``num_filters`` and ``convs_per_block``) or ``"smp"`` with options such as
            ``{"encoder_name": "resnet18"}`` (:mod:`probseg.layers.generators`).
        **kwargs: the shared options of :class:`~probseg.models.base.ProbSegModel` (``in_channels``,
            ``num_classes``, ``fusion``, ``reconstruction``, ``lr``, ``teacher``, ...).

    Loss terms: ``rec_<component>`` (by default ``rec_ce``: cross-entropy, sum over pixels, mean
    over batch) and ``kl`` (beta * analytic KL(q || p), mean over batch). Diagnostics:
    ``kl_dim<d>`` (unweighted KL per latent dimension, batch mean) and, with a warm-up,
    ``kl_weight``.
    """

    def __init__(
        self,
        *,
        num_filters: list[int] = [32, 64, 128, 192],  # noqa: B006 (plain list for YAML and hparams)
        convs_per_block: int = 3,
        latent_dim: int = 6,
        fcomb_layers: int = 4,
        beta: float = 1.0,
        kl_warmup_steps: int = 0,
        free_bits: float = 0.0,
        generator: str = "unet",
        generator_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.kl_objective = KLDivergence(beta, kl_warmup_steps, free_bits)
        self.objectives = [self.kl_objective]
        self.network = self.build_network()
        self.hparams["generator_options"] = without_weights_file(generator_options)

    def generator_arguments(self) -> dict[str, Any]:
        """The generator options of the network (subclasses pass them to their larger network)."""
        return {"generator": self.hparams.generator, "generator_options": self.hparams.generator_options}

    def build_network(self) -> ProbUNetNetwork:
        """The network of this model from its hyperparameters (subclasses build a larger one)."""
        hp = self.hparams
        return ProbUNetNetwork(self.in_channels, self.num_classes, hp.num_filters, hp.convs_per_block, hp.latent_dim,
                               hp.fcomb_layers, **self.generator_arguments())

"""PHiSeg: hierarchical latents at several resolutions, residual logits summed coarse to fine.

Baumgartner et al. 2019, "PHiSeg: Capturing Uncertainty in Medical Image Segmentation", MICCAI.

Latent maps z_l at the coarsest ``latent_levels`` of R resolution levels (the paper: 5 of 7 for
128x128 images, so z_0 is 32x32 and z_4 2x2, with 2 channels each), a prior p(z_l | z_{l+1}, x)
and a posterior q(z_l | z_{l+1}, x, y) per level (:mod:`probseg.layers.hierarchical`), and a
likelihood that sees the latents only: each z_l is refined and upsampled, the levels are merged
coarse to fine, and each level l adds residual logits s_l (nearest-upsampled to the image size):

.. math::
    \\hat y_l = \\sum_{j \\ge l} s_j, \\qquad \\hat y = \\hat y_0

Training (the paper's eq. 6 and its code):

.. math::
    \\mathcal L = \\sum_{l} \\mathrm{CE}(y, \\hat y_l)
        + \\beta \\sum_l w_l \\, \\mathrm{KL}\\big(q(z_l \\mid z_{l+1}, x, y) \\,\\|\\,
          p(z_l \\mid z_{l+1}, x)\\big), \\qquad w_l = 4^l

with l = 0 the finest level (a level has 4x fewer latent entries than the one below it), every
term summed over pixels or latent entries and averaged over the batch, and the prior run on the
posterior's draws. The CE of the final logits is the task's reconstruction (``rec_ce``, or any
``reconstruction`` mix); the coarser accumulations add ``rec_level<l>`` with the same loss
(``deep_supervision=False`` leaves them out). Hypotheses: ancestral draws from the prior, coarsest
level first; the image is encoded once.

Reading of the official code, where the paper is silent: the posterior sees the one-hot
segmentation minus 0.5; sigma is a softplus. Differences from it: no batch normalisation (the
zoo's blocks have none), the likelihood's merge blocks keep each level's width, and the top
level's mean comes from a 1x1 convolution like every other head (the code uses 3x3 there).

Gini: :meth:`PHiSegNetwork.prior_sigmas` gives every level's prior sigmas together (the whole
model's value); :meth:`PHiSegNetwork.prior_sigmas_per_level` gives each level's, which the Gini
callback logs as ``train/gini_level<l>``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from probseg._ops import one_hot
from probseg.layers.blocks import conv_block
from probseg.layers.gaussian import Generators
from probseg.layers.hierarchical import HierarchicalLatents, per_image_generators
from probseg.layers.unet import check_image
from probseg.models.base import ProbSegModel
from probseg.models.network import Network, NetworkOutput
from probseg.models.objectives import HierarchicalKL, LossTerms, Objective, StepContext
from probseg.models.registry import register_model

KL_WEIGHTINGS = ("exponential", "uniform")


def mask_channels(target: torch.Tensor, num_classes: int, dtype: torch.dtype, shift: float = 0.0) -> torch.Tensor:
    """(B, H, W) class ids or (B, K, H, W) probabilities -> (B, K, H, W) channels minus ``shift``."""
    channels = one_hot(target, num_classes) if target.ndim == 3 else target
    return channels.to(dtype) - shift


def level_weights(kind: str, levels: int) -> list[float]:
    """w_l, finest level first: 4^l ("exponential", PHiSeg) or 1 ("uniform")."""
    if kind not in KL_WEIGHTINGS:
        raise ValueError(f"kl_weighting must be one of {KL_WEIGHTINGS}, got {kind!r}")
    return [4.0**level if kind == "exponential" else 1.0 for level in range(levels)]


class PHiSegLikelihood(nn.Module):
    """Latent maps (coarse to fine) -> per-level residual logits at the image size.

    Each z_l is refined by two convolutions and upsampled ``2^r_min`` times (r_min: the finest
    latent level's resolution), so the finest level's logits are at full resolution; the levels
    merge coarse to fine by upsampling the coarser merged features and concatenating them.
    """

    def __init__(self, num_classes: int, num_filters: list[int], latent_levels: int, latent_dim: int,
                 convs_per_block: int) -> None:
        super().__init__()
        depth = len(num_filters)
        self.upsamplings = depth - latent_levels  # r_min
        widths = [num_filters[latent_levels - 1 - j] for j in range(latent_levels)]  # coarse to fine
        self.widths = widths
        self.refine = nn.ModuleList()
        for width in widths:
            steps = [conv_block(latent_dim, width, 2)]
            steps += [conv_block(width, width, 1) for _ in range(self.upsamplings)]
            self.refine.append(nn.ModuleList(steps))
        self.lift = nn.ModuleList(conv_block(widths[j - 1], widths[j], 1) for j in range(1, latent_levels))
        self.merge = nn.ModuleList(conv_block(2 * widths[j], widths[j], convs_per_block) for j in range(1, latent_levels))
        self.heads = nn.ModuleList(nn.Conv2d(width, num_classes, 1) for width in widths)

    def forward(self, latents: list[torch.Tensor], size: tuple[int, int]) -> list[torch.Tensor]:
        """Residual logits s_l per level, coarse to fine, each (N, K, H, W)."""
        logits = []
        merged = None
        for j, z in enumerate(latents):
            steps = self.refine[j]
            h = steps[0](z)
            for step in steps[1:]:
                h = step(F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False))
            if merged is not None:
                up = self.lift[j - 1](F.interpolate(merged, size=h.shape[-2:], mode="bilinear", align_corners=False))
                h = self.merge[j - 1](torch.cat([h, up], dim=1))
            merged = h
            logits.append(F.interpolate(self.heads[j](h), size=size, mode="nearest"))
        return logits


class HierarchicalNetwork(Network):
    """What PHiSeg and the HPU-Net share: a prior and a posterior of hierarchical latents
    (:class:`~probseg.layers.hierarchical.HierarchicalLatents`), the input check, the posterior's
    draws for a target, S prior draws per image with the image encoded once, and the Gini's sigmas.

    Args:
        in_channels, num_classes, num_filters, convs_per_block, latent_levels, latent_dim: as in
            :class:`PHiSeg`.
        carry_state, sigma_activation: as in :class:`~probseg.layers.hierarchical.HierarchicalLatents`.
    """

    posterior_shift = 0.0
    """Subtracted from the one-hot target the posterior sees (PHiSeg's code: 0.5)."""

    def __init__(self, in_channels: int, num_classes: int, num_filters: list[int], convs_per_block: int,
                 latent_levels: int, latent_dim: int, carry_state: bool, sigma_activation: str) -> None:
        super().__init__()
        num_filters = list(num_filters)
        self.in_channels, self.num_classes = in_channels, num_classes
        self.prior = HierarchicalLatents(in_channels, num_filters, convs_per_block, latent_levels, latent_dim,
                                         carry_state, sigma_activation)
        self.posterior = HierarchicalLatents(in_channels + num_classes, num_filters, convs_per_block, latent_levels,
                                             latent_dim, carry_state, sigma_activation)
        self.downsampling = 2 ** (len(num_filters) - 1)

    def check(self, images: torch.Tensor) -> None:
        check_image(images, self.in_channels, self.downsampling)

    def posterior_draws(self, images: torch.Tensor, target: torch.Tensor, generator: Generators = None
                        ) -> tuple[list, list[torch.Tensor]]:
        """(posteriors, their draws), per level coarse to fine, for the fused training target."""
        self.check(images)
        mask = mask_channels(target, self.num_classes, images.dtype, self.posterior_shift)
        posteriors, z_q, _ = self.posterior(torch.cat([images, mask], dim=1), generator=generator)
        return posteriors, z_q

    def prior_draws(self, images: torch.Tensor, num_samples: int, generator: Generators = None, tile_from: int = 0
                    ) -> tuple[list[torch.Tensor], torch.Tensor | None, list[torch.Tensor | None]]:
        """S ancestral prior draws per image (rows image-major, B S), the image encoded once.

        Returns the latents (coarse to fine), the decoder state and the encoder features repeated
        S times per image from level ``tile_from`` on (finer levels a caller does not read are
        None, not copied).
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.check(images)
        features = self.prior.down(images)
        skips = [None if r < tile_from else f.repeat_interleave(num_samples, dim=0) for r, f in enumerate(features)]
        generators = per_image_generators(generator, num_samples, images.shape[0])
        _, z_p, state = self.prior(images, skips=skips, generator=generators)
        return z_p, state, skips

    def prior_sigmas_per_level(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"level<l>": (B, d h w)} prior sigmas, l = 0 the finest, each level conditioned on the
        means of the levels above."""
        sigmas = self.prior.sigmas(images)
        return {f"level{l}": sigma for l, sigma in enumerate(sigmas[::-1])}

    def prior_sigmas(self, images: torch.Tensor) -> torch.Tensor:
        """Every level's prior sigmas side by side, (B, sum_l d h_l w_l): the whole model's."""
        return torch.cat(self.prior.sigmas(images), dim=1)


class PHiSegNetwork(HierarchicalNetwork):
    """PHiSeg's prior, posterior and likelihood.

    Args:
        in_channels, num_classes, num_filters, convs_per_block, latent_levels, latent_dim: as in
            :class:`PHiSeg`.

    Forward outputs: ``logits`` (the final accumulation, from the posterior's draws),
    ``level_logits`` (the coarser accumulations y_hat_l, finest of them first: l = 1, 2, ...),
    ``posteriors`` and ``priors`` (per level, coarse to fine).
    """

    posterior_shift = 0.5

    def __init__(self, in_channels: int, num_classes: int, num_filters: list[int], convs_per_block: int,
                 latent_levels: int, latent_dim: int) -> None:
        super().__init__(in_channels, num_classes, num_filters, convs_per_block, latent_levels, latent_dim,
                         carry_state=False, sigma_activation="softplus")
        self.likelihood = PHiSegLikelihood(num_classes, list(num_filters), latent_levels, latent_dim, convs_per_block)

    def forward(self, batch: dict[str, Any], target: torch.Tensor,
                generator: torch.Generator | None = None) -> NetworkOutput:
        images = batch["image"]
        posteriors, z_q = self.posterior_draws(images, target, generator)
        priors, _, _ = self.prior(images, given=z_q)
        residuals = self.likelihood(z_q, images.shape[-2:])
        accumulated = list(torch.stack(residuals).cumsum(0).unbind())  # coarse to fine: y_hat_{L-1} ... y_hat_0
        return {"logits": accumulated[-1], "level_logits": accumulated[-2::-1], "posteriors": posteriors,
                "priors": priors}

    def sample(self, images: torch.Tensor, num_samples: int = 16, generator: Generators = None) -> torch.Tensor:
        # the likelihood reads the latents only: the encoder's finer levels are not repeated
        z_p, _, _ = self.prior_draws(images, num_samples, generator, tile_from=self.prior.resolutions[-1])
        logits = torch.stack(self.likelihood(z_p, images.shape[-2:])).sum(0)
        return logits.view(images.shape[0], num_samples, *logits.shape[1:])


class DeepSupervision(Objective):
    """PHiSeg's reconstruction of the coarser accumulations: ``rec_level<l>`` (l >= 1), each the
    task's reconstruction loss of ``outputs["level_logits"][l - 1]`` against the target, times
    ``weight``.

    Args:
        loss: the task's :class:`~probseg.losses.ReconstructionLoss`.
        weight: the weight of each level's term (the official code: 1).
    """

    name = "deep_supervision"

    def __init__(self, loss: Any, weight: float = 1.0) -> None:
        self.loss = loss
        self.weight = weight

    def __call__(self, context: StepContext) -> LossTerms:
        terms = LossTerms()
        for level, logits in enumerate(context.outputs["level_logits"], start=1):
            components = self.loss(logits, context.target)
            terms[f"rec_level{level}"] = self.weight * torch.stack(list(components.values())).sum()
        return terms


@register_model("phiseg")
class PHiSeg(ProbSegModel):
    """PHiSeg (registry name ``"phiseg"``).

    Args:
        num_filters: channels per resolution level (the paper, 128x128: [32, 64, 128, 192, 192,
            192, 192], 7 levels); H and W must be divisible by 2^(levels - 1).
        convs_per_block: 3x3 convolutions per block (the paper: 3).
        latent_levels: latent levels at the coarsest resolutions (the paper: 5 of 7). Adapt
            both to the image size: 64x64 images with 6 levels and 4 latent levels keep the
            paper's latent sizes 2x2 ... 16x16 relative to the image.
        latent_dim: channels of each latent map (the paper: 2).
        beta: weight of the whole KL sum.
        kl_weighting: "exponential" (w_l = 4^l, the paper) or "uniform" (w_l = 1).
        deep_supervision: add the coarser accumulations' reconstruction terms (the paper).
        kl_warmup_steps, free_bits: as for :class:`~probseg.models.punet.ProbUNet` (free bits
            floor each level's batch-mean KL).
        **kwargs: the shared options of :class:`~probseg.models.base.ProbSegModel`.

    Loss terms: ``rec_<component>`` (final logits), ``rec_level<l>`` (coarser accumulations) and
    ``kl``; diagnostics ``kl_level<l>``.
    """

    def __init__(
        self,
        *,
        num_filters: list[int] = [32, 64, 128, 192, 192, 192, 192],  # noqa: B006 (plain list for YAML and hparams)
        convs_per_block: int = 3,
        latent_levels: int = 5,
        latent_dim: int = 2,
        beta: float = 1.0,
        kl_weighting: str = "exponential",
        deep_supervision: bool = True,
        kl_warmup_steps: int = 0,
        free_bits: float = 0.0,
        **kwargs: Any,
    ) -> None:
        weights = level_weights(kl_weighting, latent_levels)
        super().__init__(**kwargs)
        self.network = PHiSegNetwork(self.in_channels, self.num_classes, num_filters, convs_per_block, latent_levels,
                                     latent_dim)
        self.objectives = [HierarchicalKL(weights, beta, kl_warmup_steps, free_bits)]
        if deep_supervision:
            self.objectives.insert(0, DeepSupervision(self.reconstruction.loss))
